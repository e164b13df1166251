"""The recipes bundled with m2pt (the repository's ``recipes/`` folder)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from m2pt_cli import config

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


@dataclass
class RecipeSummary:
    path: Path
    name: str
    backbone: str
    model: str
    description: str


def bundled() -> list[Path]:
    """Paths of the bundled recipe files, sorted."""
    return sorted(RECIPES_DIR.glob("*.yaml"))


def summarize(path: Path) -> RecipeSummary:
    """Name, backbone, model and description of a recipe file (validated)."""
    recipe = config.load(path)
    model = recipe.model.name_or_path
    if Path(model).is_absolute():
        model = str(Path(model).relative_to(RECIPES_DIR.parent)) if model.startswith(str(RECIPES_DIR.parent)) else model
    return RecipeSummary(path, recipe.name, recipe.model.backbone, model, recipe.description)
