"""Adapter files: ``adapter.safetensors`` (trained tensors only) + ``m2pt_adapter.json``, written atomically."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from m2pt_cli import __version__
from m2pt_cli.errors import UserError, first_line, quote
from m2pt_cli.locks import is_lock
from m2pt_cli.reading import MiB, loads, read_json

FORMAT_VERSION = 1
WEIGHTS = "adapter.safetensors"
CONFIG = "m2pt_adapter.json"
RECIPE = "recipe.yaml"
CARD = "README.md"  # the model card of an hf export
MAX_META_BYTES = 8 * MiB  # m2pt_adapter.json: names and shapes of at most MAX_TENSORS tensors
MAX_TENSORS = 16384  # an adapter holds prompts and trained modules: LoRA on every linear layer of a 7B is ~900
MAX_HEADER_BYTES = 8 * MiB  # MAX_TENSORS entries of a few hundred bytes each
MAX_NAME_CHARS = 512
ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
ITEM_BYTES |= {"U64": 8, "U32": 4, "U16": 2, "F8_E4M3": 1, "F8_E5M2": 1}
OWN_FILES = frozenset({WEIGHTS, CONFIG, RECIPE, CARD})  # every file an m2pt adapter folder may hold


def sha256(path: Path, progress: bool = False) -> str:
    """The file's SHA-256; ``progress`` shows a tqdm bar of the bytes hashed (on stderr)."""
    digest = hashlib.sha256()
    bar = None
    if progress:
        from tqdm import tqdm

        total = os.path.getsize(path)
        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"hashing {Path(path).name}")
    try:
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
                if bar is not None:
                    bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    return digest.hexdigest()


def write_adapter(
    folder: Path,
    state: dict[str, torch.Tensor],
    meta: dict[str, Any],
    dtype: torch.dtype | None = None,
    extra_files: dict[str, str] | None = None,
    overwrite: bool = False,
    others: str = "refuse",
) -> Path:
    """Write tensors and metadata into ``folder``; a command writes only its own files.

    A new folder is built as a temporary sibling and renamed whole. Into an existing folder the
    files are renamed one by one, the weights first and ``m2pt_adapter.json`` (which holds their
    checksum) last, so a crash in between is a checksum error on load, never a mixed adapter.

    Args:
        state: adapter tensors (names as ``M2PTModel.adapter_state_dict``).
        meta: what the JSON records besides format, versions, dtype and checksum.
        dtype: cast floating tensors to this dtype (default: keep).
        extra_files: name -> text written beside (e.g. the resolved recipe).
        overwrite: replace an adapter already in ``folder`` (its own files only).
        others: ``"refuse"``: a folder holding any file that is not an adapter's is an error
            naming it; ``"keep"``: such files are left alone (a trainer checkpoint's own state).
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    folder = Path(folder)
    check_destination(folder, overwrite, others)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        tensors = {
            k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
            for k, v in state.items()
        }
        try:
            save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt", "m2pt_format": str(FORMAT_VERSION)})
        except SafetensorError as exc:  # a full disk surfaces here as an I/O error
            raise UserError(f"cannot write {folder} ({exc}); nothing partial was kept") from None
        sort_header(tmp / WEIGHTS)
        record = {
            **meta,
            "format_version": FORMAT_VERSION,
            "m2pt_version": __version__,
            "dtype": str(next(iter(tensors.values())).dtype).removeprefix("torch.") if tensors else None,
            "tensors": {k: list(v.shape) for k, v in tensors.items()},
            "sha256": sha256(tmp / WEIGHTS),
        }
        (tmp / CONFIG).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        _default_permissions(tmp)
        if not folder.exists():
            os.replace(tmp, folder)
            return folder
        written = [WEIGHTS, *(extra_files or {}), CONFIG]
        for name in written:
            os.replace(tmp / name, folder / name)
        for name in OWN_FILES - set(written):  # an earlier adapter's leftovers (e.g. its model card)
            (folder / name).unlink(missing_ok=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def sort_header(path: Path) -> None:
    """Rewrite a safetensors file's JSON header with its keys sorted, in place: safetensors writes
    its metadata in hash-map order, which changes from one write to the next, so the same tensors
    got another SHA-256 each time. The sorted header holds the same characters, so it has the same
    length and the tensor data is not touched (a shorter one is padded with spaces, as the format
    allows; a longer one cannot happen, and is refused rather than written)."""
    with open(path, "r+b") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length))
        text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        if len(text) > length:
            raise RuntimeError(f"{path}: the sorted safetensors header is longer than the written one")
        handle.seek(8)
        handle.write(text.ljust(length, b" "))


def check_destination(folder: Path, overwrite: bool, others: str = "refuse") -> None:
    """Refuse to write an adapter where it would replace what is not the command's to replace."""
    folder = Path(folder)
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise UserError(f"{folder}: exists and is not a folder; pass a new or empty folder")
    if not folder.exists():
        return
    entries = sorted(p for p in folder.iterdir() if not is_lock(p))  # the lock export holds there
    is_adapter = (folder / CONFIG).is_file()
    foreign = [p for p in entries if not (is_adapter and p.name in OWN_FILES and p.is_file() and not p.is_symlink())]
    if foreign and others == "refuse":
        raise UserError(
            f"{folder}: holds {foreign[0].name}, which is not part of an m2pt adapter; m2pt writes only into a "
            "new or empty folder, or one holding an earlier m2pt adapter"
        )
    if is_adapter and not overwrite:
        raise UserError(f"{folder}: already holds an m2pt adapter; --overwrite replaces it, or pass another folder")


def _default_permissions(folder: Path) -> None:
    """mkdtemp makes a private folder; give the result the permissions a plain mkdir would."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for path in folder.iterdir():
        os.chmod(path, 0o666 & ~umask)


def read_meta(folder: Path) -> dict[str, Any]:
    """An adapter folder's ``m2pt_adapter.json``, its format checked."""
    folder = Path(folder)
    config_path, weights_path = folder / CONFIG, folder / WEIGHTS
    if not config_path.is_file() or not weights_path.is_file():
        raise UserError(f"{folder}: not an m2pt adapter (needs {CONFIG} and {WEIGHTS})")
    meta = read_json(config_path, CONFIG, MAX_META_BYTES)
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        found = meta.get("format_version") if isinstance(meta, dict) else None
        raise UserError(f"{config_path}: adapter format {quote(found)}, this m2pt reads {FORMAT_VERSION}")
    return meta


def tensor_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """The shapes of an adapter's tensors from the safetensors header alone (no tensor data is read),
    to compare with a model before anything is allocated; see ``read_header``."""
    return {name: shape for name, (shape, _) in read_header(folder).items()}


def read_header(folder: Path) -> dict[str, tuple[tuple[int, ...], int]]:
    """Name -> (shape, bytes) of each tensor of ``adapter.safetensors``, read from its header within
    bounds before anything else: the header at most ``MAX_HEADER_BYTES``, at most ``MAX_TENSORS``
    tensors with printable names of at most ``MAX_NAME_CHARS``, known dtypes, offsets that tile the
    data, and a file exactly as long as the header says (a file padded to a terabyte is refused
    here, before it is hashed). Each problem is one ``UserError`` line naming the file."""
    path = Path(folder) / WEIGHTS
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size < 8:
                raise UserError(f"{path}: unreadable (shorter than a safetensors header)")
            length = int.from_bytes(handle.read(8), "little")
            if length > MAX_HEADER_BYTES or length > size - 8:
                raise UserError(
                    f"{path}: its header claims {length:,} bytes; an adapter's header is at most "
                    f"{MAX_HEADER_BYTES:,} and within the file ({size:,} bytes)"
                )
            raw = handle.read(length)
    except OSError as exc:
        raise UserError(f"{path}: unreadable ({exc.strerror})") from None
    header = loads(raw, f"{path} (header)", max_depth=4)
    if not isinstance(header, dict):
        raise UserError(f"{path}: unreadable (the header is not a JSON object)")
    header.pop("__metadata__", None)
    if len(header) > MAX_TENSORS:
        raise UserError(f"{path}: holds {len(header):,} tensors; an adapter holds at most {MAX_TENSORS:,}")
    tensors: dict[str, tuple[tuple[int, ...], int]] = {}
    spans = []
    for name, entry in header.items():
        if not (0 < len(name) <= MAX_NAME_CHARS and name.isprintable()):
            raise UserError(f"{path}: tensor name {quote(name)} is not a printable name of at most {MAX_NAME_CHARS}")
        entry = entry if isinstance(entry, dict) else {}
        shape, offsets, dtype = entry.get("shape"), entry.get("data_offsets"), entry.get("dtype")
        if (
            dtype not in ITEM_BYTES
            or not isinstance(shape, list)
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
            or not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in offsets)
        ):
            raise UserError(f"{path}: tensor {quote(name)} has no valid dtype, shape and data_offsets")
        nbytes = ITEM_BYTES[dtype] * math.prod(shape)
        if offsets[1] - offsets[0] != nbytes:
            span = offsets[1] - offsets[0]
            raise UserError(f"{path}: tensor {quote(name)}: offsets span {span:,} bytes, its shape needs {nbytes:,}")
        tensors[name] = (tuple(shape), nbytes)
        spans.append((offsets[0], offsets[1]))
    end = 0
    for begin, stop in sorted(spans):
        if begin != end:
            raise UserError(f"{path}: tensor data overlaps or leaves a gap at byte {begin:,}")
        end = stop
    if 8 + length + end != size:
        raise UserError(
            f"{path}: {size:,} bytes, its header describes {8 + length + end:,}; the file is truncated or padded"
        )
    return tensors


def read_verified_meta(folder: Path, progress: bool = False) -> dict[str, Any]:
    """An adapter's metadata once its tensor file matches the checksum it records (hashed once;
    ``progress``: with a progress bar)."""
    meta = read_meta(folder)
    read_header(folder)  # bounded: count, names, header and file size, before the file is hashed
    verify_checksum(folder, meta, progress)
    return meta


def verify_checksum(folder: Path, meta: dict[str, Any], progress: bool = False) -> str:
    """Hash ``adapter.safetensors`` (``progress``: with a progress bar) and return the SHA-256 once
    it equals the one ``meta`` records; check its header first (``read_header``)."""
    weights_path = Path(folder) / WEIGHTS
    digest = sha256(weights_path, progress)
    if digest != meta.get("sha256"):
        raise UserError(f"{weights_path}: checksum does not match {CONFIG}; the file is truncated or altered")
    return digest


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """An adapter's tensors (safetensors only, no pickle); check the checksum first (``read_verified_meta``)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights_path = Path(folder) / WEIGHTS
    try:
        return load_file(str(weights_path))
    except (SafetensorError, OSError) as exc:
        raise UserError(f"{weights_path}: unreadable ({first_line(exc)})") from None


def read_adapter(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and metadata of an adapter folder, checksum verified (safetensors only, no pickle)."""
    meta = read_verified_meta(folder)
    return read_tensors(folder), meta


def find_adapter(path: Path) -> Path:
    """The adapter folder behind ``path``: itself, a run's ``adapter/``, or a run's newest checkpoint."""
    path = Path(path)
    if (path / CONFIG).is_file():
        return path
    if (path / "adapter" / CONFIG).is_file():
        return path / "adapter"
    checkpoints = sorted(
        (p for p in path.glob("checkpoint-*") if (p / CONFIG).is_file()), key=lambda p: int(p.name.split("-")[-1])
    )
    if checkpoints:
        return checkpoints[-1]
    raise UserError(f"{path}: no m2pt adapter here (expected {CONFIG}, adapter/ or checkpoint-N/)")


def recipe_of(adapter: Path) -> Path:
    """The resolved recipe an adapter was trained with (beside it, or its run's config.yaml)."""
    for candidate in (adapter / "recipe.yaml", adapter.parent / "config.yaml"):
        if candidate.is_file():
            return candidate
    raise UserError(f"{adapter}: no recipe.yaml beside the adapter and no config.yaml in its run folder")


def belongs_to_adapter(recipe_file: Path) -> bool:
    """Whether ``recipe_file`` is the recipe an adapter came with (``recipe_of``'s candidates)."""
    folder = Path(recipe_file).parent
    if Path(recipe_file).name == RECIPE:
        return (folder / CONFIG).is_file()
    if Path(recipe_file).name == "config.yaml":
        return (folder / "adapter" / CONFIG).is_file() or any(folder.glob(f"checkpoint-*/{CONFIG}"))
    return False
