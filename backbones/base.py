"""The contract between the M²PT core and a model family (a backbone plugin)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from torch import nn


class ModelSource(Protocol):
    """Where a backbone finds its weights (the recipe's ``model`` section)."""

    name_or_path: str
    revision: str | None
    dtype: str
    attn_implementation: str
    trust_remote_code: bool
    weights: str


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

    @abstractmethod
    def load(self, source: ModelSource, device: str = "cpu") -> Loaded:
        """Load weights and processor from a hub id or a local folder."""

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
    def module(self, model: nn.Module, name: str) -> nn.Module:
        """The module a ``trainable`` name refers to (``projector``, ``lm_head``, ...)."""

    @abstractmethod
    def build_inputs(self, processor: Any, images: Sequence[Any], texts: Sequence[str]) -> dict:
        """Model inputs for rendered prompt texts (image placeholders expanded), padded as the
        processor's tokenizer is set (left for generation)."""

    @abstractmethod
    def pixel_values(self, processor: Any, images: Sequence[Any]) -> Any:
        """The vision tower's input for a list of RGB images."""
