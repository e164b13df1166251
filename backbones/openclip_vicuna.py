"""The paper's own base: an open_clip ViT + a LLaVA-style projector + a Llama-family LLM (Vicuna).

Recipe keys: ``model.name_or_path`` is the LLM (lmsys/vicuna-7b-v1.3 or a folder),
``model.vision_tower`` the open_clip model (ViT-L-14, 'hf-hub:org/repo', or a folder holding
open_clip_config.json and weights), ``model.vision_pretrained`` its pretrained tag (openai) or
checkpoint file, ``model.projector`` linear or mlp2x_gelu, ``model.projector_weights`` LLaVA's
``mm_projector.bin`` (a local file or HUB_REPO/FILE). Images are preprocessed by open_clip; the
LLM sees the patch features of the second-to-last ViT block (CLS dropped), one token per patch, at
the ``<image>`` placeholder of the Vicuna v1 prompt, as in LLaVA.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from m2pt_cli.backbones.base import (
    Backbone,
    BackboneError,
    DecoderTower,
    Loaded,
    ModelKey,
    ModelSource,
    Tower,
    decoder_tower,
    hf_config,
    load_hf_model,
    repeat_image_tokens,
    torch_dtype,
)

IMAGE_TOKEN = "<image>"
PROJECTOR_PREFIX = "mm_projector."
OPEN_CLIP_SAFETENSORS = "open_clip_model.safetensors"  # the weights file open_clip's hub repos hold
PROJECTORS = ("linear", "mlp2x_gelu")  # LLaVA's projector types


class OpenClipVicuna(nn.Module):
    """open_clip ViT -> projector -> causal LM, called like transformers' LLaVA.

    ``input_ids`` hold ``image_token_id`` once per image patch; those positions get the projected
    patch features (the id itself may lie outside the LLM's vocabulary and is never embedded).

    Args:
        visual: an open_clip ``VisionTransformer`` (batch-first blocks).
        projector: maps ViT width to LLM width (``nn.Linear`` or Linear-GELU-Linear).
        language_model: a transformers causal LM (``LlamaForCausalLM``).
        image_token_id: the placeholder id.
        feature_layer: ViT block whose output is used (-2: the second-to-last, LLaVA's choice).
    """

    def __init__(
        self, visual: nn.Module, projector: nn.Module, language_model: nn.Module, image_token_id: int, feature_layer=-2
    ):
        super().__init__()
        if not getattr(visual.transformer, "batch_first", True):
            raise BackboneError("model.vision_tower: open_clip towers that run sequence-first are not supported")
        self.visual = visual
        self.projector = projector
        self.language_model = language_model
        self.image_token_id = image_token_id
        self.feature_index = feature_layer % len(visual.transformer.resblocks)

    @property
    def config(self):
        """The LLM's config (what trainers and generation utilities read)."""
        return self.language_model.config

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(images, patches, LLM width): the chosen block's patch tokens (CLS dropped), projected.

        Blocks after the chosen one are never run.
        """
        out = self.visual.forward_intermediates(
            pixel_values.to(self.visual.conv1.weight.dtype),
            indices=[self.feature_index],
            stop_early=True,
            intermediates_only=True,
            output_fmt="NLC",
        )
        return self.projector(out["image_intermediates"][0])

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """Input embeddings with each image's patch features at its placeholder positions."""
        slots = input_ids == self.image_token_id
        embeds = self.language_model.get_input_embeddings()(input_ids.masked_fill(slots, 0))
        if pixel_values is None:
            if slots.any():
                raise ValueError("input_ids hold image placeholders but no pixel_values were given")
            return embeds
        features = self.image_features(pixel_values).to(embeds.dtype)
        if int(slots.sum()) != features.shape[0] * features.shape[1]:
            raise ValueError(
                f"{int(slots.sum())} image placeholders for {features.shape[0]} images of {features.shape[1]} patches"
            )
        return embeds.masked_scatter(slots[..., None], features)

    def forward(self, input_ids=None, attention_mask=None, pixel_values=None, inputs_embeds=None, **kwargs):
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, pixel_values)
        return self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, pixel_values=None, **kwargs):
        """The LLM's ``generate`` from the merged embeddings; returns prompt ids + new ids."""
        embeds = self.embed(input_ids, pixel_values)
        return self.language_model.generate(
            input_ids=input_ids, inputs_embeds=embeds, attention_mask=attention_mask, **kwargs
        )

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None, **options) -> None:
        """Recompute activations in backward: the LLM's blocks (transformers) and the ViT's (open_clip,
        non-reentrant per block)."""
        from m2pt_cli.hf_conventions import enable_activation_checkpointing

        enable_activation_checkpointing(self.language_model, activation_checkpointing_kwargs, **options)
        self.visual.set_grad_checkpointing(True)

    def activation_checkpointing_disable(self) -> None:
        from m2pt_cli.hf_conventions import disable_activation_checkpointing

        disable_activation_checkpointing(self.language_model)
        self.visual.set_grad_checkpointing(False)


class OpenClipVicunaProcessor:
    """Tokenizer + open_clip preprocessing, with ``<image>`` expanded to one token per patch.

    Follows the parts of transformers' processor interface that m2pt uses (``tokenizer``,
    ``image_token``, ``chat_template``, ``apply_chat_template``, ``__call__``).
    """

    def __init__(self, tokenizer: Any, transform: Any, tokens_per_image: int):
        if tokenizer.pad_token is None:  # Vicuna ships none; LLaVA pads with unk
            tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
        if IMAGE_TOKEN not in tokenizer.get_vocab():
            from tokenizers import AddedToken

            tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
        self.tokenizer = tokenizer
        self.transform = transform
        self.tokens_per_image = tokens_per_image
        self.image_token = IMAGE_TOKEN
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.chat_template = tokenizer.chat_template  # the LLM's own (chat_template: processor); may be None

    def apply_chat_template(self, messages, chat_template=None, add_generation_prompt=False, tokenize=False):
        """Render with ``chat_template`` or the LLM's own. Contents become strings with ``<image>`` inline
        (a text-only LLM's template reads a string), which m2pt's templates also accept."""
        return self.tokenizer.apply_chat_template(
            [{**message, "content": _content_text(message["content"])} for message in messages],
            chat_template=chat_template or self.chat_template,
            add_generation_prompt=add_generation_prompt,
            tokenize=tokenize,
        )

    def pixel_values(self, images: Sequence[Any]) -> torch.Tensor:
        return torch.stack([self.transform(image) for image in images])

    def __call__(self, images=None, text=(), return_tensors="pt", padding=True) -> dict:
        expanded = [t.replace(IMAGE_TOKEN, IMAGE_TOKEN * self.tokens_per_image) for t in text]
        out = dict(self.tokenizer(expanded, return_tensors=return_tensors, padding=padding))
        if images:
            out["pixel_values"] = self.pixel_values(images)
        return out


def _content_text(content: str | list[dict[str, str]]) -> str:
    """A message's content as one string: image parts become ``<image>\\n``, text parts their text."""
    if isinstance(content, str):
        return content
    return "".join(IMAGE_TOKEN + "\n" if part["type"] == "image" else part["text"] for part in content)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def build_projector(kind: str, vision_width: int, text_width: int) -> nn.Module:
    """LLaVA's projector types: ``linear``, or ``mlp2x_gelu`` (Linear, GELU, Linear)."""
    if kind == "linear":
        return nn.Linear(vision_width, text_width)
    return nn.Sequential(nn.Linear(vision_width, text_width), nn.GELU(), nn.Linear(text_width, text_width))


def projector_state(location: str) -> dict[str, torch.Tensor]:
    """The projector tensors of a LLaVA ``mm_projector.bin`` (keys ``model.mm_projector.*``), or of a
    safetensors file, with the prefix removed. ``location``: a file, or HUB_REPO/FILE on the hub.

    ``.bin`` files are read with ``torch.load(weights_only=True)``: tensors only, no code.
    """
    path = Path(location).expanduser()
    if not path.is_file():
        parts = location.split("/")
        if location.startswith(("/", ".", "~")) or len(parts) < 3:
            raise BackboneError(f"model.projector_weights: {location!r} is not a file (nor HUB_REPO/FILE)")
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download(repo_id="/".join(parts[:2]), filename="/".join(parts[2:])))
        except Exception as exc:  # not found, gated, offline: the hub client's errors have no common base
            raise BackboneError(f"model.projector_weights: cannot fetch {location!r} ({_first_line(exc)})") from None
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        raw = load_file(str(path))
    else:
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle errors come in many types
            raise BackboneError(f"model.projector_weights: {path} is not a tensor file ({exc})") from None
    return {key.split(PROJECTOR_PREFIX, 1)[-1]: value for key, value in raw.items()}


def load_projector(projector: nn.Module, location: str, kind: str) -> None:
    """Copy LLaVA projector weights into ``projector``; errors name the file, keys and shapes."""
    state = projector_state(location)
    expected = projector.state_dict()
    if set(state) != set(expected):
        raise BackboneError(
            f"model.projector_weights: {location} holds tensors {sorted(state)}, a {kind} projector needs "
            f"{sorted(expected)} (set model.projector to match the file: linear or mlp2x_gelu)"
        )
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise BackboneError(
                f"model.projector_weights: {location}: {key} has shape {tuple(value.shape)}, "
                f"this vision tower and LLM need {tuple(expected[key].shape)}"
            )
    projector.load_state_dict(state)


def _open_clip_name(name: str) -> str:
    import open_clip

    if not name:
        raise BackboneError(
            "model.vision_tower: backbone openclip_vicuna needs an open_clip model (e.g. ViT-L-14) or a folder"
        )
    if Path(name).expanduser().is_dir():
        return f"local-dir:{Path(name).expanduser()}"
    if name.startswith(("hf-hub:", "local-dir:")) or name in open_clip.list_models():
        return name
    close = difflib.get_close_matches(name, open_clip.list_models(), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise BackboneError(f"model.vision_tower: {name!r} is not an open_clip model nor a folder{hint}")


def tower_weights(name: str, tag: str) -> str | None:
    """The safetensors file a tower's weights come from: a folder, a hub repository or a file must
    offer safetensors (open_clip reads other checkpoints with ``torch.load`` and, on some errors, a
    full unpickle). None for one of open_clip's own pretrained tags, which open_clip fetches."""
    if name.startswith("local-dir:"):
        folder = Path(name.removeprefix("local-dir:"))
        found = sorted(folder.glob("*.safetensors"))
        if not found:
            raise BackboneError(
                f"model.vision_tower: {folder} holds no .safetensors weights; m2pt does not unpickle tower "
                "checkpoints (.bin/.pth): convert it with safetensors.torch.save_file"
            )
        preferred = [p for p in found if p.name == OPEN_CLIP_SAFETENSORS]
        return str((preferred or found)[0])
    if name.startswith("hf-hub:"):
        from huggingface_hub import hf_hub_download

        repo = name.removeprefix("hf-hub:")
        try:
            return hf_hub_download(repo_id=repo, filename=OPEN_CLIP_SAFETENSORS)
        except Exception as exc:  # not found, gated, offline: the hub client's errors have no common base
            raise BackboneError(
                f"model.vision_tower: {name} offers no {OPEN_CLIP_SAFETENSORS} ({_first_line(exc)}); m2pt does not "
                "unpickle tower checkpoints"
            ) from None
    if tag and Path(tag).is_file():
        if Path(tag).suffix != ".safetensors":
            raise BackboneError(
                f"model.vision_pretrained: {tag} is not a .safetensors file; m2pt does not unpickle tower "
                "checkpoints: convert it with safetensors.torch.save_file, or use an open_clip pretrained tag"
            )
        return tag
    return None


def create_visual(source: ModelSource, pretrained: bool = True, device: str = "cpu") -> tuple[nn.Module, Any]:
    """The open_clip vision tower and its eval preprocessing.

    A pretrained tag trained with QuickGELU (OpenAI's) gets QuickGELU, as open_clip's tag says.
    """
    import open_clip

    name = _open_clip_name(source.vision_tower)
    tag = source.vision_pretrained if pretrained and source.weights != "random" else ""
    quick_gelu = False
    if tag and not Path(tag).is_file() and not name.startswith(("hf-hub:", "local-dir:")):
        cfg = open_clip.get_pretrained_cfg(name, tag)
        if not cfg:
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
            raise BackboneError(f"model.vision_pretrained: {tag!r} is not a pretrained tag of {name} (tags: {tags})")
        quick_gelu = bool(cfg.get("quick_gelu", False))
    if tag and Path(tag).is_file() and "quickgelu" not in name.lower():
        logging.getLogger("m2pt").warning(
            "model.vision_pretrained is a file, which does not say its activation: OpenAI CLIP weights "
            "need QuickGELU, i.e. model.vision_tower: %s-quickgelu",
            name,
        )
    load_weights = pretrained and source.weights != "random"
    ourselves = load_weights and (name.startswith(("hf-hub:", "local-dir:")) or bool(tag and Path(tag).is_file()))
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            name,
            pretrained=None if ourselves or not tag else tag,
            force_quick_gelu=quick_gelu,
            force_image_size=source.vision_image_size or None,
            load_weights=load_weights and not ourselves,
            device=device,
        )
    except (OSError, RuntimeError, ValueError) as exc:  # what open_clip raises for configs, tags and files
        raise BackboneError(f"model.vision_tower: cannot load {source.vision_tower!r} ({_first_line(exc)})") from None
    if ourselves:
        weights = tower_weights(name, tag)
        try:
            open_clip.load_checkpoint(model, weights)
        except (OSError, RuntimeError, ValueError) as exc:  # a damaged file, tensors of another model
            raise BackboneError(f"model.vision_tower: cannot load {weights} ({_first_line(exc)})") from None
    return model.visual, preprocess


def _tokens_per_image(visual: nn.Module) -> int:
    grid = visual.grid_size
    return int(grid[0] * grid[1])


class OpenClipVicunaBackbone(Backbone):
    """open_clip ViT + projector + Llama-family LLM (the paper's base).

    Trainable module names: ``projector``, ``lm_head``, ``language_model``, ``vision_tower``.
    """

    trainable_modules = ("projector", "lm_head", "language_model", "vision_tower")
    model_keys = (
        ModelKey(
            "vision_tower",
            "",
            "open_clip model name (ViT-L-14), 'hf-hub:org/repo', or a folder with open_clip_config.json",
            is_path=True,
        ),
        ModelKey(
            "vision_pretrained",
            "",
            "open_clip pretrained tag (openai) or checkpoint file ('' = random init)",
            is_path=True,
        ),
        ModelKey("vision_image_size", 0, "input size in pixels the tower is built for (0 = its own, e.g. 224)"),
        ModelKey("projector", "linear", "linear or mlp2x_gelu (LLaVA's projector types)", choices=PROJECTORS),
        ModelKey(
            "projector_weights",
            "",
            "LLaVA mm_projector.bin, a local file or HUB_REPO/FILE ('' = random init)",
            is_path=True,
        ),
    )

    def load(self, source: ModelSource, device: str = "cpu") -> Loaded:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        hub = {"revision": source.revision, "trust_remote_code": source.trust_remote_code}
        llm = load_hf_model(AutoModelForCausalLM, source, hf_config(source, "openclip_vicuna"), device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the same tower and projector every time when no weights are given
            visual, preprocess = create_visual(source)
            projector = build_projector(source.projector, visual.transformer.width, llm.config.hidden_size)
        if source.projector_weights:
            load_projector(projector, source.projector_weights, source.projector)
        processor = OpenClipVicunaProcessor(
            AutoTokenizer.from_pretrained(source.name_or_path, **hub), preprocess, _tokens_per_image(visual)
        )
        dtype = torch_dtype(source.dtype)
        model = OpenClipVicuna(visual.to(dtype), projector.to(dtype), llm, processor.image_token_id)
        return Loaded(model=model.to(device).eval(), processor=processor)

    def load_processor(self, source: ModelSource) -> Any:
        from transformers import AutoTokenizer

        hub = {"revision": source.revision, "trust_remote_code": source.trust_remote_code}
        visual, preprocess = create_visual(source, pretrained=False, device="meta")  # its grid, no weights
        tokenizer = AutoTokenizer.from_pretrained(source.name_or_path, **hub)
        return OpenClipVicunaProcessor(tokenizer, preprocess, _tokens_per_image(visual))

    def build_empty(self, source: ModelSource) -> nn.Module:
        from transformers import AutoModelForCausalLM

        config = hf_config(source, "openclip_vicuna")
        quiet = logging.getLogger()  # open_clip warns on the root logger that no weights were loaded
        level, quiet.level = quiet.level, logging.ERROR
        try:
            with torch.device("meta"):
                visual, _ = create_visual(source, pretrained=False, device="meta")
                llm = AutoModelForCausalLM.from_config(config, dtype=torch_dtype(source.dtype))
                projector = build_projector(source.projector, visual.transformer.width, config.hidden_size)
        finally:
            quiet.level = level
        return OpenClipVicuna(visual, projector, llm, image_token_id=-1)

    def vision_tower(self, model: nn.Module) -> Tower:
        blocks = model.visual.transformer.resblocks
        unused = tuple(range(model.feature_index + 1, len(blocks)))
        return Tower(blocks=blocks, width=model.visual.transformer.width, unused_layers=unused)

    def language_tower(self, model: nn.Module) -> DecoderTower:
        return decoder_tower(model.language_model.get_decoder(), model.language_model.config.hidden_size)

    def module(self, model: nn.Module, name: str) -> nn.Module:
        parts = {
            "projector": model.projector,
            "lm_head": model.language_model.get_output_embeddings(),
            "language_model": model.language_model,
            "vision_tower": model.visual,
        }
        return parts[name]

    def image_token_id(self, processor: Any) -> int:
        return processor.image_token_id

    def place_image_tokens(self, processor: Any, ids: list[int], has_image: bool = True) -> list[int]:
        return repeat_image_tokens(ids, processor.image_token_id, processor.tokens_per_image)

    def image_inputs(self, processor: Any, images: Sequence[Any], instructions: Sequence[str]) -> dict:
        return {"pixel_values": processor.pixel_values(images)}

    def build_inputs(
        self, processor: Any, images: Sequence[Any], texts: Sequence[str], instructions: Sequence[str] | None = None
    ) -> dict:
        return processor(images=list(images), text=list(texts))
