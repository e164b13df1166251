"""The contract between the M²PT core and a model family (a backbone plugin)."""

from __future__ import annotations

import builtins
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """Map a recipe dtype name to a torch dtype."""
    return DTYPES[name]


class BackboneError(ValueError):
    """Bad input a backbone detects (a checkpoint it cannot wrap, a record it cannot take); the
    message names the recipe key or record and what is allowed. The CLI reports it in one line."""


class ModelKey(str):
    """A key of the recipe's ``model`` section that one backbone reads besides the common ones.

    A backbone lists its keys in ``Backbone.model_keys``; the core adds them to the ``model`` section
    of recipes naming that backbone (checked, suggested on a typo, refused by other backbones,
    overridable as ``model.NAME=VALUE``, shown by ``m2pt info``, saved in every run's and adapter's
    ``recipe.yaml``) and hands their values to the backbone as attributes of its ``ModelSource``.
    A ``ModelKey`` is the key's name (a ``str``), carrying its declaration.

    Args:
        name: the key (a Python identifier, not one of the common keys such as ``dtype``).
        default: its value when a recipe leaves it out.
        help: one line on what it takes.
        is_path: a value written ``./x`` or ``../x`` is relative to the recipe file (as
            ``name_or_path``); others are taken as written.
        type: what a value must be: ``str``, ``int``, ``float``, ``bool``, or a union such as
            ``int | None`` (None: the default's type).
        choices: the allowed values (empty: any value of ``type``).
    """

    default: Any
    help: str
    is_path: bool
    type: Any
    choices: tuple[Any, ...]

    def __new__(
        cls,
        name: str,
        default: Any,
        help: str,
        is_path: bool = False,
        type: Any = None,
        choices: Sequence[Any] = (),
    ) -> ModelKey:
        if not name.isidentifier():
            raise ValueError(f"model key {name!r} must be a Python identifier")
        if default is None and type is None:
            raise ValueError(f"model key {name!r}: a None default needs a type, e.g. type=str | None")
        key = super().__new__(cls, name)
        key.default, key.help, key.is_path = default, help, is_path
        key.type = builtins.type(default) if type is None else type
        key.choices = tuple(choices)
        return key

    def __repr__(self) -> str:
        return f"ModelKey({str(self)!r}, default={self.default!r})"

    def __reduce__(self) -> tuple:
        return self.__class__, (str(self), self.default, self.help, self.is_path, self.type, self.choices)


class ModelSource(Protocol):
    """Where a backbone finds its weights (the recipe's ``model`` section): the common keys below,
    and each of the backbone's own ``model_keys`` as an attribute of the same name."""

    name_or_path: str
    revision: str | None
    dtype: str
    attn_implementation: str
    trust_remote_code: bool
    weights: str
    quantization: str


@dataclass(frozen=True)
class Tower:
    """A stack of transformer blocks that can hold deep prompts.

    Attributes:
        blocks: the blocks, in order.
        width: hidden size of the blocks.
        unused_layers: blocks whose output never reaches the language model (left out of ``all``).
    """

    blocks: Sequence[nn.Module]
    width: int
    unused_layers: tuple[int, ...] = ()


@dataclass(frozen=True)
class DecoderTower(Tower):
    """A causal decoder stack in the Hugging Face calling convention (keyword arguments
    ``inputs_embeds``, ``attention_mask``, ``position_ids``, ``past_key_values``).

    Attributes:
        stack: the module whose forward runs all blocks (e.g. ``LlamaModel``).
        embed: maps token ids to input embeddings.
        attn_implementation: the attention kernel the stack uses.
    """

    stack: nn.Module | None = None
    embed: Callable | None = None
    attn_implementation: str = "sdpa"


def decoder_tower(stack: nn.Module, width: int) -> DecoderTower:
    """The ``DecoderTower`` of a Hugging Face decoder stack (``LlamaModel``, ``OPTDecoder``, ...)."""
    from m2pt_cli import hf_conventions

    return DecoderTower(
        blocks=stack.layers,
        width=width,
        stack=stack,
        embed=stack.get_input_embeddings(),
        attn_implementation=hf_conventions.attn_implementation(stack.config),
    )


def repeat_image_tokens(ids: list[int], image_id: int, count: int) -> list[int]:
    """``ids`` with each ``image_id`` repeated ``count`` times (one placeholder -> one token per patch)."""
    out: list[int] = []
    for token in ids:
        out += [token] * (count if token == image_id else 1)
    return out


# The backbone made for each multimodal checkpoint type (for error messages).
BACKBONE_FOR_MODEL_TYPE = {"llava": "llava", "instructblip": "instructblip"}


def hf_config(source: ModelSource, backbone: str, model_types: tuple[str, ...] | None = None) -> Any:
    """The checkpoint's config, refused with a ``BackboneError`` unless its ``model_type`` is one of
    ``model_types`` (None: any language model without a vision part), so that a checkpoint of another
    family is never loaded with its weights left random."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(
        source.name_or_path, revision=source.revision, trust_remote_code=source.trust_remote_code
    )
    kind = config.model_type
    wrong = kind not in model_types if model_types else hasattr(config, "vision_config")
    if wrong:
        wanted = " or ".join(model_types) if model_types else "a language model alone (e.g. lmsys/vicuna-7b-v1.3)"
        other = BACKBONE_FOR_MODEL_TYPE.get(kind)
        hint = f"; use model.backbone: {other}" if other and other != backbone else ""
        raise BackboneError(
            f"model.name_or_path: {source.name_or_path} is a {kind!r} checkpoint; backbone {backbone} takes "
            f"{wanted}{hint}"
        )
    return config


def load_hf_model(model_class: Any, source: ModelSource, config: Any, device: str | None = None) -> nn.Module:
    """``model_class`` with pretrained weights, or with seeded random weights from its config alone
    (``model.weights: random``, for benchmarks). With ``model.quantization`` 8bit or 4bit its linear
    layers are stored by bitsandbytes (on ``device``), except those ``m2pt_cli.quantization.keeping``
    names."""
    from m2pt_cli import quantization

    dtype = torch_dtype(source.dtype)
    quantized = quantization.hf_config(source.quantization, dtype)
    if source.weights == "random":
        torch.manual_seed(0)
        from m2pt_cli.hf_conventions import model_from_config

        with torch.device(device or "cpu"):  # drawn where it runs: a 7B draws in seconds on a GPU, minutes on CPU
            model = model_from_config(model_class, config, dtype=dtype, attn_implementation=source.attn_implementation)
        if quantized is None:
            return model
        # the same seeded weights, stored as a quantized load stores them
        return model_class.from_pretrained(
            None,
            config=config,
            state_dict=model.state_dict(),
            dtype=dtype,
            attn_implementation=source.attn_implementation,
            quantization_config=quantized,
            device_map={"": device or "cpu"},
        )
    placement = {"quantization_config": quantized, "device_map": {"": device or "cpu"}} if quantized else {}
    return model_class.from_pretrained(
        source.name_or_path,
        config=config,
        revision=source.revision,
        dtype=dtype,
        attn_implementation=source.attn_implementation,
        trust_remote_code=source.trust_remote_code,
        **placement,
    )


@dataclass
class Loaded:
    """A base model and its processor, as a backbone loads them."""

    model: nn.Module
    processor: Any = None
    notes: list[str] = field(default_factory=list)


class Backbone(ABC):
    """A model family M²PT can wrap.

    Subclasses name the modules M²PT needs; the core never imports the model library.
    """

    #: Names accepted in a recipe's ``trainable`` list, besides the prompts.
    trainable_modules: ClassVar[tuple[str, ...]] = ("projector",)
    #: Whether the image goes where the prompt text has its ``<image>`` placeholder (LLaVA), or the
    #: processor puts the image tokens itself and the text must not mention the image (InstructBLIP).
    image_in_text: ClassVar[bool] = True
    #: Keys of the recipe's ``model`` section this backbone reads besides the common ones (each a
    #: ``ModelKey``: name, default, help, whether it is a path); their values reach ``load`` and
    #: ``build_empty`` as attributes of the ``ModelSource``.
    model_keys: ClassVar[tuple[ModelKey, ...]] = ()

    @abstractmethod
    def load(self, source: ModelSource, device: str = "cpu") -> Loaded:
        """Load weights and processor from a hub id or a local folder."""

    def load_processor(self, source: ModelSource) -> Any:
        """The processor alone (``m2pt data`` encodes without the weights). By default it loads the
        whole model and keeps its processor; a backbone overrides this to skip the weights."""
        return self.load(source, device="cpu").processor

    @abstractmethod
    def build_empty(self, source: ModelSource) -> nn.Module:
        """Build the model on the meta device from its config alone (no weights)."""

    @abstractmethod
    def vision_tower(self, model: nn.Module) -> Tower:
        """The vision encoder's blocks."""

    @abstractmethod
    def language_tower(self, model: nn.Module) -> DecoderTower:
        """The language model's decoder blocks and stack."""

    @abstractmethod
    def module(self, model: nn.Module, name: str) -> nn.Module | nn.Parameter:
        """What a ``trainable`` name refers to (``projector``, ``lm_head``, ...): a module, or a
        single parameter (InstructBLIP's ``query_tokens``)."""

    @abstractmethod
    def image_token_id(self, processor: Any) -> int:
        """The id that marks image positions in ``input_ids``."""

    @abstractmethod
    def place_image_tokens(self, processor: Any, ids: list[int], has_image: bool = True) -> list[int]:
        """The ``input_ids`` that ``build_inputs`` gives a text, from the tokenizer's ids of that text
        (with one image when ``has_image``: image tokens placed and expanded), without running the
        image processor: the training data's token ids. Raises ``BackboneError`` for a record this
        backbone cannot take."""

    @abstractmethod
    def image_inputs(self, processor: Any, images: Sequence[Any], instructions: Sequence[str]) -> dict:
        """The model's image inputs for a batch of RGB images (``pixel_values``, and for models
        that read the instruction next to the image, such as InstructBLIP's Q-Former, its tokens)."""

    @abstractmethod
    def build_inputs(
        self, processor: Any, images: Sequence[Any], texts: Sequence[str], instructions: Sequence[str] | None = None
    ) -> dict:
        """Model inputs for rendered prompt texts, padded as the processor's tokenizer is set (left
        for generation). ``instructions`` are the plain user requests (default: ``texts``)."""
