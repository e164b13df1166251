"""``M2PTModel``: a frozen multimodal base model plus the M²PT adapter (prompts + trained modules)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from m2pt_cli import hf_conventions
from m2pt_cli import prompts as prompt_hooks
from m2pt_cli.backbones.base import Backbone


@dataclass
class M2PTConfig:
    """What an adapter is: which layers hold prompts, how long and how wide, what else is trained.

    Layer indices are base-model block indices, ascending.
    """

    backbone: str
    vision_layers: list[int]
    vision_length: int
    vision_width: int
    vision_total_layers: int
    text_layers: list[int]
    text_length: int
    text_width: int
    text_total_layers: int
    trainable: list[str] = field(default_factory=list)
    vision_unused_layers: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class M2PTModel(nn.Module):
    """The base model with deep visual and textual prompts attached through hooks.

    Calling it is calling the base model: ``.logits`` align one-to-one with ``input_ids`` and
    ``.loss`` is computed when ``labels`` are given; ``generate()`` follows transformers.
    Only the prompts and the modules named in ``config.trainable`` require gradients.

    Args:
        base: the multimodal model (its weights are frozen, its modules untouched).
        backbone: the plugin that knows where the base's towers and modules are.
        config: the resolved adapter config.
        vision_init, text_init: prompt initialisation (``xavier``, ``normal``, ``zeros``).
        seed: seed of the prompt initialisation.
    """

    def __init__(
        self,
        base: nn.Module,
        backbone: Backbone,
        config: M2PTConfig,
        vision_init: str = "xavier",
        text_init: str = "xavier",
        seed: int = 0,
    ):
        super().__init__()
        self.base = base
        self.backbone = backbone
        self.m2pt_config = config
        generator = torch.Generator().manual_seed(seed)
        vision, text = backbone.vision_tower(base), backbone.language_tower(base)
        self.vision_prompts = nn.Parameter(
            prompt_hooks.init_prompts(
                len(config.vision_layers), config.vision_length, vision.width, vision_init, generator
            )
        )
        self.text_prompts = nn.Parameter(
            prompt_hooks.init_prompts(len(config.text_layers), config.text_length, text.width, text_init, generator)
        )
        base.requires_grad_(False)
        for name in config.trainable:
            backbone.module(base, name).requires_grad_(True)
        self._handles = prompt_hooks.attach_encoder_prompts(vision.blocks, config.vision_layers, self.vision_prompts)
        self._handles += prompt_hooks.attach_decoder_prompts(
            text.stack, text.blocks, config.text_layers, self.text_prompts, text.embed
        )

    # -- calling the base ---------------------------------------------------------------

    def forward(self, **inputs):
        return self.base(**inputs)

    @torch.no_grad()
    def generate(self, **inputs):
        return self.base.generate(**inputs)

    @property
    def config(self):
        """The base model's config (so trainers and generation utilities find it)."""
        return self.base.config

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None, **options) -> None:
        """Recompute activations in backward (non-reentrant by default: prompts enter as inputs)."""
        kwargs = {"use_reentrant": False, **(activation_checkpointing_kwargs or {})}
        hf_conventions.enable_activation_checkpointing(self.base, kwargs, **options)
        if not kwargs["use_reentrant"]:  # a frozen tower need not back-propagate
            hf_conventions.drop_input_require_grads(self.base)

    def activation_checkpointing_disable(self) -> None:
        hf_conventions.disable_activation_checkpointing(self.base)

    gradient_checkpointing_enable = activation_checkpointing_enable

    def remove_prompts(self) -> nn.Module:
        """Detach every hook and return the base model as it was loaded (trained modules stay)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        return self.base

    # -- the adapter ----------------------------------------------------------------------

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained tensors: ``vision_prompts`` (layers, Nv, Dv), ``text_prompts`` (layers, Nt, Dt)
        and each trained module's own state dict under its name (``projector.linear_1.weight``)."""
        return {key: tensor.detach() for key, tensor in self._adapter_tensors().items()}

    def _adapter_tensors(self) -> dict[str, torch.Tensor]:
        """Adapter key -> the live tensor (parameter or buffer) it reads."""
        state = {"vision_prompts": self.vision_prompts, "text_prompts": self.text_prompts}
        covered = set()
        for name in self.m2pt_config.trainable:
            for key, value in self._trained(name).items():
                # a tied tensor (lm_head = embed_tokens) is one tensor: stored once, under its first name
                if id(value) not in covered:
                    state[key] = value
                    covered.add(id(value))
        for key, param in self.base.named_parameters():  # e.g. LoRA weights injected into the base
            if param.requires_grad and id(param) not in covered:
                state[f"base.{key}"] = param
        return state

    def _trained(self, name: str) -> dict[str, torch.Tensor]:
        """Adapter key -> tensor for one ``trainable`` name (a module's state dict, or one parameter)."""
        part = self.backbone.module(self.base, name)
        if isinstance(part, nn.Parameter):
            return {name: part}
        return {f"{name}.{key}": value for key, value in part.state_dict(keep_vars=True).items()}

    def adapter_key_map(self) -> dict[str, str]:
        """``self.state_dict()`` key -> adapter key, for trainers that hand over a full state dict."""
        by_id = {id(t): key for key, t in self._adapter_tensors().items()}
        return {name: by_id[id(t)] for name, t in self.state_dict(keep_vars=True).items() if id(t) in by_id}

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> list[str]:
        """Copy trained tensors in; returns the keys that were not expected.

        Raises:
            ValueError: a tensor is missing or has another shape.
        """
        own = self._adapter_tensors()
        missing = sorted(set(own) - set(state))
        if missing:
            raise ValueError(f"adapter is missing tensors: {', '.join(missing)}")
        for key, target in own.items():
            if tuple(state[key].shape) != tuple(target.shape):
                raise ValueError(
                    f"adapter tensor {key} has shape {tuple(state[key].shape)}, the model needs {tuple(target.shape)}"
                )
        with torch.no_grad():
            for key, target in own.items():
                target.copy_(state[key].to(device=target.device, dtype=target.dtype))
        return sorted(set(state) - set(own))

    def parameter_groups(self) -> dict[str, int]:
        """Trainable parameter counts by group: vision_prompts, text_prompts, then each module."""
        groups = {"vision_prompts": self.vision_prompts.numel(), "text_prompts": self.text_prompts.numel()}
        tensors = self._adapter_tensors()  # tied tensors once
        for name in self.m2pt_config.trainable:
            groups[name] = sum(
                t.numel()
                for key, t in tensors.items()
                if isinstance(t, nn.Parameter) and (key == name or key.startswith(f"{name}."))
            )
        other = sum(t.numel() for key, t in tensors.items() if key.startswith("base."))
        if other:
            groups["other"] = other
        return groups

    def base_parameter_count(self) -> int:
        """Parameters of the base model (tied weights counted once)."""
        return sum(p.numel() for p in self.base.parameters())
