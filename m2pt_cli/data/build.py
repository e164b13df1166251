"""Recipe ``data`` section -> encoded train and held-out datasets, with bad records skipped or refused."""

from __future__ import annotations

import gc
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from m2pt_cli.chat import IMAGE_PLACEHOLDER
from m2pt_cli.data import cache
from m2pt_cli.data.cache import SourceFindings
from m2pt_cli.data.encode import Encoder
from m2pt_cli.data.grouping import lengths_and_images
from m2pt_cli.data.images import DEFAULT_MAX_PIXELS, image_problem
from m2pt_cli.data.sources import read_source
from m2pt_cli.errors import UserError, quote

log = logging.getLogger("m2pt")

COLUMNS = ["id", "image", "conversations", "input_ids", "labels"]


def _encoded_features() -> dict[str, Any]:
    import datasets

    return {
        "input_ids": datasets.List(datasets.Value("int32")),
        "labels": datasets.List(datasets.Value("int32")),
        "truncated": datasets.Value("bool"),
        "problem": datasets.Value("string"),
    }


@dataclass
class DataReport:
    """What preparing the data found."""

    records: int = 0
    kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_ids: list[str] = field(default_factory=list)
    truncated: int = 0
    train: int = 0
    held_out: int = 0
    seconds: float = 0.0
    tokens: dict[str, int] = field(default_factory=dict)  # min, median, max tokens per kept record
    cache: list[str] = field(default_factory=list)  # one line per source: reused or built, and where

    def add(self, findings: SourceFindings) -> None:
        self.records += findings.records
        self.truncated += findings.truncated
        for reason, count in findings.skipped.items():
            self.skipped[reason] = self.skipped.get(reason, 0) + count
        self.skipped_ids.extend(findings.skipped_ids[: max(0, 5 - len(self.skipped_ids))])

    def lines(self) -> list[str]:
        out = [f"data: {self.records} records, {self.kept} usable, {self.train} train, {self.held_out} held out"]
        if self.tokens:
            t = self.tokens
            out.append(f"data: tokens per record: min {t['min']}, median {t['median']}, max {t['max']}")
        if self.truncated:
            out.append(f"data: {self.truncated} samples truncated to max_length")
        for reason, count in sorted(self.skipped.items()):
            out.append(f"data: skipped {count} records: {reason}")
        if self.skipped_ids:
            out.append(f"data: first skipped ids: {', '.join(quote(i, bare=True) for i in self.skipped_ids[:5])}")
        return out


def _check_and_encode(row: dict[str, Any], encoder: Encoder, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict[str, Any]:
    out = {"input_ids": [], "labels": [], "truncated": False, "problem": row.get("problem") or ""}
    if out["problem"]:
        return out
    turns = row["conversations"]
    placeholders = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in turns)
    has_image = row["image"] is not None
    if not any(t["from"] in ("gpt", "assistant") for t in turns):
        out["problem"] = "no assistant reply"
    elif placeholders > (1 if has_image else 0):
        out["problem"] = "more <image> placeholders than images"
    elif has_image and placeholders == 0:
        out["problem"] = "an image but no <image> placeholder"
    else:
        out["problem"] = image_problem(row["image"], max_pixels)
    if out["problem"]:
        return out
    try:
        encoded = encoder.encode(turns, row["id"], has_image)
    except UserError as exc:
        out["problem"] = str(exc).split(": ", 1)[-1]
        return out
    if encoded is None:
        out["problem"] = "longer than max_length (the image or every reply would be cut)"
        return out
    out.update(input_ids=encoded.input_ids, labels=encoded.labels, truncated=encoded.truncated)
    return out


def _processes(num_proc: int, records: int) -> int:
    """Worker processes for encoding ``records``: ``num_proc`` (0: this machine's cores), never more
    than one per 500 records (a pool costs more than it saves on small data)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(num_proc or cores, records // 500))


def _findings(encoded) -> tuple[SourceFindings, list[int] | None]:
    """What the checks found in an encoded source, and the kept rows' indices (None: all kept)."""
    import pyarrow.compute as pc

    problems = encoded.data.column("problem")
    bad = pc.not_equal(problems, "")
    findings = SourceFindings(records=len(encoded))
    n_bad = pc.sum(bad).as_py() or 0
    kept = None
    if n_bad:
        for item in pc.value_counts(pc.filter(problems, bad)).to_pylist():
            findings.skipped[item["values"]] = item["counts"]
        first = pc.indices_nonzero(bad).slice(0, 5).to_pylist()
        findings.skipped_ids = [encoded[i]["id"] for i in first]
        row = encoded[first[0]]
        image = (row["image"] or {}).get("path") or ""
        findings.first_bad = {"id": row["id"], "problem": row["problem"], "image": image}
        kept = pc.indices_nonzero(pc.invert(bad)).to_pylist()
    findings.kept = len(encoded) - n_bad
    truncated = encoded.data.column("truncated")
    findings.truncated = pc.sum(truncated if kept is None else pc.filter(truncated, pc.invert(bad))).as_py() or 0
    return findings, kept


def _encode_source(source, key: str, encoder: Encoder, data_cfg, entry: cache.Entry, raw=None):
    """Read (unless ``raw`` is given), check and encode one source into its cache entry; returns
    (rows, findings)."""
    import datasets

    started = time.monotonic()
    if int(os.environ.get("LOCAL_RANK", "0")):  # under a launcher the machine's first process encodes
        log.warning(
            "data: %s: process %s of this machine is encoding it too: the first process's cache entry %s "
            "is not readable here (is $M2PT_CACHE a folder every process of the machine sees?)",
            key,
            os.environ["LOCAL_RANK"],
            entry.folder,
        )
    partial = entry.partial()
    work = partial / "work"
    work.mkdir()
    if raw is None:
        raw = read_source(source, key, scratch=work)
    # one image feature for every format (undecoded {bytes, path} or None), so sources mix
    raw = raw.cast_column("image", datasets.Image(decode=False))
    if len(raw) == 0:  # nothing to encode (datasets' map would not even add the columns)
        return entry.store(partial, raw, SourceFindings()), SourceFindings()
    if "problem" not in raw.column_names:
        raw = raw.add_column("problem", [""] * len(raw))
    processes = _processes(data_cfg.num_proc, len(raw))
    if processes > 1:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the workers are forked; each is one core
    features = raw.features.copy()
    features.update(_encoded_features())
    max_pixels = data_cfg.max_image_pixels
    if processes > 1:  # the forked workers would otherwise walk the parent's whole heap at every full collection
        gc.freeze()
    try:
        encoded = raw.map(
            lambda row: _check_and_encode(row, encoder, max_pixels),
            features=features,
            num_proc=processes if processes > 1 else None,
            cache_file_name=str(work / "encoded.arrow"),
            new_fingerprint=entry.folder.name,  # the entry's key: no hashing of the encoder
            desc=f"{key} encoding",
        )
    finally:
        gc.unfreeze()
    findings, kept = _findings(encoded)
    if kept is not None:  # the kept rows written out: an entry holds no index mapping
        encoded = encoded.select(kept).flatten_indices(cache_file_name=str(work / "kept.arrow"))
    rows = entry.store(partial, encoded, findings)
    log.info(
        "data: %s: %s records encoded in %.1f s with %d process%s; cached in %s",
        key,
        f"{findings.records:,}",
        time.monotonic() - started,
        processes,
        "" if processes == 1 else "es",
        entry.folder,
    )
    return rows, findings


def _source_rows(source, key: str, encoder: Encoder, encoding_id: str, data_cfg):
    """One source's kept rows and findings: from the cache, else encoded into it."""
    raw = None
    if source.format == "hf":  # the library's fingerprint of the loaded table pins its content
        raw = read_source(source, key)
    entry = cache.Entry.named(cache.source_identity(source, raw._fingerprint if raw is not None else None), encoding_id)
    found = entry.load()
    if found is not None:
        log.info("data: %s: %s records from the cache %s", key, f"{found[1].records:,}", entry.folder)
        rows, findings, where = found[0], found[1], f"{key}: reused {entry.folder}"
    else:
        rows, findings = _encode_source(source, key, encoder, data_cfg, entry, raw)
        where = f"{key}: built {entry.folder}"
    return (rows.select_columns(COLUMNS) if rows is not None else None), findings, where


def token_counts(parts) -> dict[str, int]:
    """min, median and max tokens per record over ``parts`` (read from the Arrow offsets)."""
    import numpy as np

    lengths = [lengths_and_images(p)[0] for p in parts if len(p)]
    if not lengths:
        return {}
    joined = np.concatenate(lengths)
    return {"min": int(joined.min()), "median": int(np.median(joined)), "max": int(joined.max())}


def prepare(data_cfg, processor: Any, backbone: Any, template: str, seed: int):
    """Read, check, encode, mix and split the recipe's sources, each source's encoding cached
    (:mod:`m2pt_cli.data.cache`) and memory-mapped.

    Returns:
        (train dataset, held-out dataset or None, DataReport). Datasets have columns ``id``,
        ``image`` ({bytes, path} or None), ``conversations``, ``input_ids``, ``labels``.
    Raises:
        UserError: a bad record under ``on_bad_record: error``, or no usable record at all.
    """
    import datasets

    started = time.monotonic()
    encoder = Encoder(processor, backbone, template, data_cfg.max_length)
    report = DataReport()
    parts, weights = [], []
    if not data_cfg.sources:
        raise UserError("data.sources: the recipe names no training data")
    encoding_id = cache.encoding_identity(encoder, data_cfg)
    for i, source in enumerate(data_cfg.sources):
        key = f"data.sources[{i}]"
        rows, findings, where = _source_rows(source, key, encoder, encoding_id, data_cfg)
        report.cache.append(where)
        report.add(findings)
        if findings.first_bad and data_cfg.on_bad_record == "error":
            first = findings.first_bad
            hint = "set data.on_bad_record: skip to skip such records"
            named = f" ({quote(first['image'])})" if first["image"] else ""
            raise UserError(f"{key}: record {quote(first['id'], bare=True)}: {first['problem']}{named} ({hint})")
        if rows is not None:
            parts.append(rows)
            weights.append(source.weight)
    report.kept = sum(len(p) for p in parts)
    if report.kept == 0:
        for line in report.lines():
            log.info(line)
        raise UserError("data: no usable records (see the skipped counts above)")
    report.tokens = token_counts(parts)
    held_out = None
    split_parts = []
    for part in parts:
        n_eval = _eval_count(data_cfg.eval_size, len(part))
        if n_eval:
            train_part, test_part = split_off(part, n_eval, seed)
            split_parts.append(train_part)
            held_out = test_part if held_out is None else datasets.concatenate_datasets([held_out, test_part])
        else:
            split_parts.append(part)
    if len(split_parts) == 1:
        train = split_parts[0]
    else:
        total = sum(weights)
        train = datasets.interleave_datasets(
            split_parts, probabilities=[w / total for w in weights], seed=seed, stopping_strategy="all_exhausted"
        )
    report.train, report.held_out = len(train), len(held_out) if held_out is not None else 0
    report.seconds = time.monotonic() - started
    for line in report.lines():
        log.info(line)
    return train, held_out, report


def split_off(part, n_eval: int, seed: int):
    """(train, held out): ``datasets``' ``train_test_split(test_size=n_eval, seed=seed)``, the same
    rows, with the index mappings kept in memory (that method writes them next to the data, which
    here is the shared cache)."""
    import numpy as np

    permutation = np.random.default_rng(seed).permutation(len(part))
    return part.select(permutation[n_eval:], keep_in_memory=True), part.select(
        permutation[:n_eval], keep_in_memory=True
    )


def _eval_count(eval_size: float, n: int) -> int:
    if eval_size <= 0:
        return 0
    count = int(eval_size) if eval_size >= 1 else round(eval_size * n)
    return min(max(count, 1), n - 1)
