"""One registry class for everything chosen by name in a recipe (backbones, later benches).

Entries are ``"module:attr"`` strings imported on first use, so listing names imports nothing heavy.
Third-party packages add entries through a Python entry-point group (``m2pt.backbones``).
"""

from __future__ import annotations

import importlib
import re
from importlib.metadata import entry_points
from typing import Any

from m2pt_cli.errors import UserError, did_you_mean

_NAME = re.compile(r"^[a-z][a-z0-9_\-]*$")


class Registry:
    """Name -> ``"module:attr"`` target, with plugins from an entry-point group."""

    def __init__(self, kind: str, group: str | None = None) -> None:
        self.kind = kind
        self.group = group
        self._targets: dict[str, str] = {}
        self._origins: dict[str, str] = {}
        self._plugins_loaded = group is None
        self._cache: dict[str, Any] = {}

    def register(self, name: str, target: str, origin: str = "m2pt") -> None:
        """Add ``name`` -> ``target`` (``"package.module:Attr"``).

        Raises:
            ValueError: the name is not lowercase (letters, digits, ``_``, ``-``), is taken, or the
                target is not of the form ``module:attr``.
        """
        if not _NAME.match(name):
            raise ValueError(f"{self.kind} name {name!r} must be lowercase letters, digits, '_' or '-'")
        if name in self._targets:
            raise ValueError(f"{self.kind} {name!r} is registered twice: by {self._origins[name]} and by {origin}")
        if target.count(":") != 1:
            raise ValueError(f"{self.kind} {name!r}: target {target!r} must look like 'package.module:Attr'")
        self._targets[name] = target
        self._origins[name] = origin

    def _load_plugins(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        for ep in entry_points(group=self.group):
            dist = ep.dist.name if ep.dist is not None else "an installed package"
            self.register(ep.name, ep.value, origin=dist)

    def names(self) -> list[str]:
        """All registered names, built-in and plugins, sorted."""
        self._load_plugins()
        return sorted(self._targets)

    def origin(self, name: str) -> str:
        """Who registered ``name``: ``"m2pt"`` for a built-in entry, else the plugin's distribution."""
        self.target(name)  # an unknown name is the usual one-line error
        return self._origins[name]

    def target(self, name: str) -> str:
        """The ``module:attr`` string of ``name``."""
        self._load_plugins()
        if name not in self._targets:
            raise UserError(
                f"unknown {self.kind} {name!r}{did_you_mean(name, self._targets)} "
                f"(available: {', '.join(sorted(self._targets))})"
            )
        return self._targets[name]

    def get(self, name: str) -> Any:
        """Import the entry and return an instance (classes are instantiated once)."""
        if name not in self._cache:
            module_name, attr = self.target(name).split(":")
            obj = getattr(importlib.import_module(module_name), attr)
            self._cache[name] = obj() if isinstance(obj, type) else obj
        return self._cache[name]


BACKBONES = Registry("backbone", group="m2pt.backbones")
BACKBONES.register("llava", "m2pt_cli.backbones.llava:LlavaBackbone")
BACKBONES.register("instructblip", "m2pt_cli.backbones.instructblip:InstructBlipBackbone")
BACKBONES.register("openclip_vicuna", "m2pt_cli.backbones.openclip_vicuna:OpenClipVicunaBackbone")
