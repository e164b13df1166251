"""What a command names as its model, resolved once: the adapter folder found, its recipe read, its
metadata verified and its tensor file hashed, then carried as one frozen ``ModelSource`` from that
first look to whatever loads or exports it (``m2pt eval``, ``generate``, ``chat``, ``serve``,
``attention``, ``export``, lmms-eval's ``m2pt`` model, ``m2pt_cli.load``). Nothing downstream finds,
reads, verifies or hashes the adapter again."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from m2pt_cli import adapter as adapter_files
from m2pt_cli import config as recipe_config
from m2pt_cli import export_bounds, loading, recipes, trust
from m2pt_cli.config import Recipe
from m2pt_cli.errors import UserError
from m2pt_cli.registry import BACKBONES

if TYPE_CHECKING:
    from m2pt_cli.answering import LoadedModel

# the base model alone: the adapter's recipe without prompts or trained tensors (``--base``)
BASE_ONLY = ("method=m2pt", "prompts.vision.length=0", "prompts.text.length=0")


@dataclass(frozen=True)
class ModelSource:
    """A model resolved before any weights are read; built by ``resolve_model_source`` only.

    Attributes:
        recipe: the recipe, parsed once (with the command's overrides applied).
        recipe_file: the file it was read from.
        adapter: the adapter folder to load (None: the base alone, or a recipe without an adapter).
        adapter_meta: its ``m2pt_adapter.json``, checked against the base on the meta device and
            against the tensor file's checksum.
        adapter_sha256: the SHA-256 of ``adapter.safetensors`` computed while verifying (equal to
            the one ``adapter_meta`` records).
        base_only: the base model without prompts or trained tensors was asked for (``--base``).
    """

    recipe: Recipe
    recipe_file: Path
    adapter: Path | None = None
    adapter_meta: dict[str, Any] | None = field(default=None, repr=False)
    adapter_sha256: str | None = None
    base_only: bool = False

    @property
    def base(self) -> str:
        """The base model's hub id, folder or GGUF file (``model.name_or_path``)."""
        return self.recipe.model.name_or_path

    def load(self, device: str = "cpu", trust_remote_code: bool | None = None) -> LoadedModel:
        """Build the base model, attach M²PT and the adapter already verified here, and return the
        one object that answers questions."""
        from m2pt_cli.answering import LoadedModel

        granted = trust.remote_code_granted() if trust_remote_code is None else trust_remote_code
        with trust.remote_code(granted):
            model, processor = loading.build(self.recipe, device=device)
        if self.adapter is not None:
            state = adapter_files.read_tensors(self.adapter)
            loading.attach_adapter(model, self.adapter, state, self.adapter_meta)
        backbone = BACKBONES.get(self.recipe.model.backbone)
        loaded = LoadedModel(model, processor, self.recipe, backbone, self.adapter, self.adapter_meta)
        loaded.end_of_turn  # noqa: B018 (computed now: a template whose replies cannot end is refused at load)
        return loaded


def resolve_model_source(
    adapter: str | Path | None = None,
    recipe: str | Path | None = None,
    *,
    base: str | None = None,
    base_only: bool = False,
    dtype: str | None = None,
    overrides: tuple[str, ...] = (),
    trust_remote_code: bool | None = None,
    export_limit: int | None = None,
) -> ModelSource:
    """Resolve a model once: find the adapter, read its recipe (or ``recipe``), refuse a base the
    adapter carries, then (unless ``base_only``) read its metadata, compare its tensors with the
    base built on the meta device (``loading.check_adapter``: a file that claims a terabyte is
    refused before a byte of it is read) and verify its checksum.

    Args:
        adapter: an adapter, run or checkpoint folder.
        recipe: a recipe file or bundled name (default: the adapter's own recipe).
        base: another hub id or folder for the base model, named by the user.
        base_only: the base model alone (``BASE_ONLY``); the adapter is found for its recipe only.
        dtype: overrides ``model.dtype``.
        overrides: ``key=value`` recipe overrides.
        trust_remote_code: whether the base may run its own code (None: what the command line granted).
        export_limit: check the adapter as ``m2pt export`` does (:mod:`m2pt_cli.export_bounds`):
            its tensors declare at most this many bytes, and they are compared with the base only
            where it can be read here without a download (else hashed with a progress bar).
    """
    folder = adapter_files.find_adapter(Path(adapter)) if adapter is not None else None
    if recipe is None and folder is None:
        raise UserError("no model: pass --adapter DIR or --recipe RECIPE (or train a run first)")
    recipe_file = recipes.resolve(recipe) if recipe is not None else adapter_files.recipe_of(folder)
    extra = (BASE_ONLY if base_only else ()) + tuple(overrides)
    extra += (f"model.dtype={dtype}",) if dtype else ()
    extra += (f"model.name_or_path={base}",) if base else ()
    raw = recipe_config.read_yaml(recipe_file)  # the recipe is read once
    parsed = recipe_config.load(recipe_file, extra, raw=raw)
    if base is None and export_limit is None:  # export compares with such a base never, and goes on
        loading.check_own_base(parsed, recipe_file, folder, raw)
    if folder is None or base_only:
        return ModelSource(parsed, recipe_file, base_only=base_only)
    meta = adapter_files.read_meta(folder)
    header = adapter_files.read_header(folder)  # bounded: header size, count, names, file size
    progress = False
    if export_limit is None:
        granted = trust.remote_code_granted() if trust_remote_code is None else trust_remote_code
        with trust.remote_code(granted):
            loading.check_adapter(parsed, folder, meta, {name: shape for name, (shape, _) in header.items()})
    else:
        progress = export_bounds.check(folder, meta, header, export_limit, parsed, recipe_file, raw)
    digest = adapter_files.verify_checksum(folder, meta, progress)
    return ModelSource(parsed, recipe_file, folder, meta, digest)


def load(
    source: str | Path,
    adapter: str | Path | None = None,
    device: str = "cpu",
    dtype: str | None = None,
    overrides: tuple[str, ...] = (),
    base: str | None = None,
    trust_remote_code: bool | None = None,
) -> LoadedModel:
    """Load a model with M²PT attached.

    Args:
        source: a recipe YAML file, or an adapter folder (exported, a run's ``adapter/``, a
            checkpoint, or a run folder).
        adapter: an adapter folder to load on top of a recipe ``source``.
        device: where to put the model.
        dtype: overrides ``model.dtype``.
        overrides: ``key=value`` recipe overrides.
        base: another hub id or folder for the base model (e.g. where you keep the weights).
        trust_remote_code: let the model run Python code from its repository (None: what the
            command line granted, ``--trust-remote-code``). A recipe or adapter cannot grant it.
    Returns:
        a ``LoadedModel`` (model, processor, recipe, backbone, adapter; ``answer()``); it unpacks as
        ``(model, processor)``.
    Raises:
        UserError: bad recipe, an adapter that does not fit the base (names what differs), or an
            adapter whose recipe loads a base model from inside the adapter (unless ``base`` names it).
    """
    if Path(source).is_dir():
        adapter, recipe = source, None
    else:
        recipe = source
    resolved = resolve_model_source(
        adapter, recipe, base=base, dtype=dtype, overrides=overrides, trust_remote_code=trust_remote_code
    )
    return resolved.load(device=device, trust_remote_code=trust_remote_code)
