"""The encoded-data cache: one folder per (source, encoding) pair, keyed by content, written whole
or absent, memory-mapped when read back.

A key digests everything the encoded rows depend on: the source's identity (its recipe keys, and
for files their resolved path, size and modification time; for a ``datasets`` source the library's
own fingerprint of the loaded data), the tokenizer (its whole serialized vocabulary and rules), the
chat template and processor settings (a probe conversation encoded with and without an image, which
also pins the backbone's image-token layout), ``max_length``, ``max_image_pixels`` and the m2pt and
datasets versions. Anything else gets a new key, so a stale entry is never read.

An entry is built in a ``<key>.partial-<host>-<pid>`` folder and renamed into place; a reader that
finds a damaged entry (missing files, sizes that differ from its record, an unreadable Arrow file)
logs one line, removes it and builds it again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from m2pt_cli.cache_folders import cache_folder
from m2pt_cli.errors import UserError, first_line, quote
from m2pt_cli.locks import alive
from m2pt_cli.reading import read_json

log = logging.getLogger("m2pt")

FORMAT = 2  # the layout of an entry; bumped when it changes
META = "meta.json"
DATASET = "data"  # the entry's Arrow files, part-00000.arrow, ... in row order
PROBE = [{"from": "human", "value": "<image>\nWhat is in the picture?"}, {"from": "gpt", "value": "A probe, 42."}]


def root() -> Path:
    """``$M2PT_CACHE/data``, or ``~/.cache/m2pt/data``."""
    return cache_folder("data", "encoded training data")


@dataclass
class SourceFindings:
    """What checking one source found (kept in the entry's record)."""

    records: int = 0
    kept: int = 0
    truncated: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_ids: list[str] = field(default_factory=list)
    first_bad: dict[str, str] = field(default_factory=dict)  # id, problem, image of the first bad record


def _digest(*parts: Any) -> str:
    digest = hashlib.sha256()
    for part in parts:
        data = part if isinstance(part, bytes) else json.dumps(part, sort_keys=True, default=str).encode()
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def _tokenizer_identity(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # a fast tokenizer: its whole definition as JSON
        serial = backend.to_str().encode()
    else:
        from datasets.fingerprint import Hasher

        serial = Hasher.hash(tokenizer).encode()
    template = getattr(tokenizer, "chat_template", None)
    return _digest(serial, template, getattr(tokenizer, "special_tokens_map", {}), type(tokenizer).__name__)


def encoding_identity(encoder: Any, data_cfg: Any) -> str:
    """What the encoded rows depend on besides the source (see the module's text)."""
    import datasets

    from m2pt_cli import __version__

    image = getattr(encoder.processor, "image_processor", None)
    image_settings = image.to_json_string() if hasattr(image, "to_json_string") else repr(image)
    probes = []
    for has_image in (True, False):
        turns = PROBE if has_image else [{**PROBE[0], "value": "What is 6 x 7?"}, PROBE[1]]
        try:
            encoded = encoder.encode(turns, "probe", has_image)
            probes.append(None if encoded is None else (encoded.input_ids, encoded.labels))
        except Exception as exc:  # noqa: BLE001 - a probe the encoder refuses is part of its identity too
            probes.append(type(exc).__name__)
    return _digest(
        FORMAT,
        __version__,
        datasets.__version__,
        type(encoder.backbone).__name__,
        type(encoder.processor).__name__,
        encoder.template,
        _tokenizer_identity(encoder.tokenizer),
        image_settings,
        probes,
        data_cfg.max_length,
        data_cfg.max_image_pixels,
    )


def _file_identity(path: str | Path) -> list[Any]:
    path = Path(path).expanduser()
    try:
        stat = path.stat()
    except OSError:
        return [str(path), None]
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino]


def source_identity(source: Any, raw_fingerprint: str | None = None) -> str:
    """A source's identity: its recipe keys (its mixing weight aside), and for files their identity
    (path, size, modification time), or the ``datasets`` fingerprint of what was loaded."""
    keys = {k: v for k, v in asdict(source).items() if k != "weight"}
    files: list[Any] = []
    if source.format == "llava_json":
        files = [_file_identity(source.path), _file_identity(source.image_folder or Path(source.path).parent)]
    elif source.format == "digits":
        import sklearn

        files = [sklearn.__version__]
    return _digest(keys, files, raw_fingerprint)


@dataclass(frozen=True)
class Entry:
    """One cache entry's folder."""

    folder: Path

    @classmethod
    def named(cls, source_id: str, encoding_id: str) -> Entry:
        return cls(root() / _digest(source_id, encoding_id)[:32])

    def load(self) -> tuple[Any, SourceFindings] | None:
        """(the kept rows, memory-mapped, or None when none was kept; the findings), or None when
        absent. A damaged entry is removed with one log line, and None returned."""
        if not self.folder.is_dir():
            return None
        try:
            meta = read_json(self.folder / META, "cache record")
            if meta.get("format") != FORMAT:
                raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT}")
            for name, size in meta["files"].items():
                actual = (self.folder / name).stat().st_size
                if actual != size:
                    raise ValueError(f"{name} has {actual:,} bytes, its record says {size:,}")
            import datasets

            findings = SourceFindings(**meta["findings"])
            parts = [datasets.Dataset.from_file(str(self.folder / name)) for name in meta["files"]]  # memory-mapped
            dataset = datasets.concatenate_datasets(parts) if parts else None  # none when no row was kept
            if (len(dataset) if dataset is not None else 0) != findings.kept:
                raise ValueError(f"{len(dataset)} rows, its record says {findings.kept}")
        except Exception as exc:  # noqa: BLE001 - whatever is wrong with it, it is rebuilt
            log.warning("data cache: %s is damaged (%s); building it again", self.folder, first_line(exc)[:200])
            shutil.rmtree(self.folder, ignore_errors=True)
            return None
        return dataset, findings

    def partial(self) -> Path:
        """A fresh folder to build this entry in (earlier partial folders of dead processes removed)."""
        host = socket.gethostname()
        for old in self.folder.parent.glob(f"{self.folder.name}.partial-{host}-*"):
            pid = old.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not alive(int(pid)):
                shutil.rmtree(old, ignore_errors=True)
        folder = self.folder.parent / f"{self.folder.name}.partial-{host}-{os.getpid()}"
        shutil.rmtree(folder, ignore_errors=True)
        try:
            folder.mkdir(parents=True)
        except OSError as exc:
            raise UserError(
                f"data cache {quote(str(self.folder.parent))}: cannot write ({exc.strerror}); "
                "point $M2PT_CACHE at a writable folder"
            ) from None
        return folder

    def store(self, partial: Path, dataset: Any, findings: SourceFindings) -> Any:
        """Move ``dataset``'s Arrow files (it has no index mapping) into ``partial`` with
        ``findings``, rename it into place, and return the entry's rows memory-mapped (None when
        none was kept). Another process that finished the same entry first wins."""
        files: dict[str, int] = {}
        if len(dataset):  # its Arrow files, as written under ``partial``, moved in (never re-encoded,
            (partial / DATASET).mkdir()  # nor images embedded as ``save_to_disk`` would)
            for i, cached in enumerate(dataset.cache_files):
                source, name = Path(cached["filename"]), f"{DATASET}/part-{i:05d}.arrow"
                if source.resolve().is_relative_to(partial.resolve()):
                    os.replace(source, partial / name)
                else:
                    shutil.copyfile(source, partial / name)
                files[name] = (partial / name).stat().st_size
        record = {"format": FORMAT, "files": files, "findings": asdict(findings)}
        (partial / META).write_text(json.dumps(record, indent=1))
        for scratch in partial.iterdir():
            if scratch.name not in (DATASET, META):
                shutil.rmtree(scratch, ignore_errors=True) if scratch.is_dir() else scratch.unlink()
        try:
            os.rename(partial, self.folder)
        except OSError:  # built meanwhile by another process (another node, another run): use that one
            shutil.rmtree(partial, ignore_errors=True)
        loaded = self.load()
        if loaded is None:
            raise UserError(f"data cache {quote(str(self.folder))}: written but unreadable; is the disk full?")
        return loaded[0]
