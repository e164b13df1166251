"""``m2pt eval``: greedy, batched, resumable generation on benches, scored as the references score."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from m2pt_cli import __version__, locks
from m2pt_cli import config as recipe_config
from m2pt_cli.benches import BENCHES
from m2pt_cli.benches.base import Bench, Sample
from m2pt_cli.benches.mme import RESULTS_FOLDER
from m2pt_cli.continuation import check_same, read_record
from m2pt_cli.data.collate import open_image
from m2pt_cli.data.images import DEFAULT_MAX_PIXELS
from m2pt_cli.errors import UserError, quote
from m2pt_cli.files import open_append, refuse_links, write_text_atomic
from m2pt_cli.logs import LOGGER
from m2pt_cli.ranks import Ranks, join
from m2pt_cli.reading import MAX_DEPTH, check_depth, numbered_lines
from m2pt_cli.registry import BACKBONES

if TYPE_CHECKING:
    from collections.abc import Iterator

    from m2pt_cli.answering import LoadedModel
    from m2pt_cli.model_source import ModelSource

SAMPLES = "samples-{bench}.jsonl"
PART = "samples-{bench}.rank{rank}.jsonl"  # one rank's answers in a data-parallel evaluation, merged at its end
RESULTS = "results.json"
WAY_OUT = "pass --output-dir elsewhere, or --overwrite to replace it"
OWN_ENTRIES = (RESULTS, SAMPLES.format(bench="*"), RESULTS_FOLDER)  # what an evaluation writes in its folder


@dataclass
class EvalSettings:
    """Decoding and data settings shared by every bench of one ``m2pt eval``."""

    data: str | None = None
    split: str | None = None
    limit: int | None = None
    batch_size: int = 8
    max_new_tokens: int | None = None
    keep_wording: bool = False
    qa_metric: str = "exact"


def to_rgb(image: Any, sample_id: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """A PIL image, or a ``{bytes, path}`` reference opened under the image policy (at most
    ``max_pixels``: the model recipe's ``data.max_image_pixels``), as RGB."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, dict):
        return open_image(image, sample_id, max_pixels)
    raise UserError(f"sample {quote(sample_id, bare=True)}: no image")


def get_bench(name: str, settings: EvalSettings) -> Bench:
    """A new instance of bench ``name`` configured for ``settings`` (the registered one is left as is)."""
    return type(BENCHES.get(name)).configured(settings)


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Per-sample rows of a JSONL file (blank lines ignored); see ``iter_numbered``."""
    return [row for _, row in iter_numbered(path)]


def iter_numbered(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row) for each row of a JSONL file (blank lines ignored), read one line at a
    time (``reading.numbered_lines``: each line at most ``MAX_LINE_BYTES``), so that a bad row is
    reported as soon as it is read and memory does not grow with a line or with the lines after it.

    Only a torn last line (an interrupted write) is dropped, with a note on stderr; any other line
    that is not a JSON object is an error naming the file and line number.
    """
    if not path.is_file():
        return
    lines = numbered_lines(path)
    for number, line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except RecursionError:
            raise UserError(f"{path}: line {number} is JSON nested deeper than {MAX_DEPTH} levels") from None
        except UnicodeDecodeError as exc:
            raise UserError(f"{path}: line {number} is not UTF-8 text (byte {exc.start})") from None
        except json.JSONDecodeError as exc:
            if any(rest.strip() for _, rest in lines):  # stops at the first line that is not blank
                raise UserError(
                    f"{path}: line {number} is not JSON ({exc.msg}); only a torn last line may be"
                ) from None
            LOGGER.warning("%s: dropped line %d, torn by an interrupted write (%s)", path, number, exc.msg)
            return
        if not isinstance(row, dict):
            raise UserError(f"{path}: line {number} is not a JSON object")
        if check_depth(row) is not None:
            raise UserError(f"{path}: line {number} is JSON nested deeper than {MAX_DEPTH} levels")
        yield number, row


def read_numbered(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """``iter_numbered`` as a list."""
    return list(iter_numbered(path))


def from_lmms_eval(row: dict[str, Any]) -> dict[str, Any]:
    """A row of lmms-eval's ``--log_samples`` file as m2pt reads rows: ``prediction`` from
    ``filtered_resps``, ``answer`` from ``target``, and the sample's ``category`` and image key
    (``question_id``) from the metric entries its task wrote (MME, POPE). Other rows pass unchanged."""
    if "filtered_resps" not in row or "prediction" in row:
        return row
    response = row["filtered_resps"]
    while isinstance(response, list) and len(response) == 1:
        response = response[0]
    out = {"id": str(row.get("doc_id")), "prediction": response, "answer": row.get("target")}
    for value in row.values():
        if isinstance(value, dict) and "category" in value:
            out["category"] = value["category"]
            if "question_id" in value:
                out["image_key"] = str(value["question_id"])
    return out


def rescore(
    bench: Bench,
    rows: list[dict[str, Any]],
    source: str = "--predictions",
    file: Path | None = None,
    lines: list[int] | None = None,
) -> list[dict[str, Any]]:
    """Parse and score predictions again (another tool's, or ours with a fixed parser).

    A row without what ``bench`` needs is a one-line error naming ``source``, the line (``lines``,
    else the row's position), the ``file`` and the field.
    """
    out = []
    for i, row in enumerate(rows):
        where = f"{source}: line {lines[i] if lines else i + 1}" + (f" of {file}" if file else "")
        out.append(rescore_row(bench, row, where))
    return out


def rescore_row(bench: Bench, row: dict[str, Any], where: str) -> dict[str, Any]:
    """One predictions row parsed and scored again; what ``bench`` needs and lacks is a one-line
    error naming ``where``."""
    row = from_lmms_eval(row)
    extra = row.get("extra", {})
    if not isinstance(extra, dict):
        raise UserError(f"{where}: field 'extra' must be a JSON object (got {quote(extra)})")
    extra = {**{k: v for k, v in row.items() if k in ("category", "image_key", "original_question")}, **extra}
    needs = f"a {bench.name} row needs {', '.join(bench.row_fields)}"
    for name in ("prediction", "answer"):
        if name not in row:
            raise UserError(f"{where}: no field {name!r} ({needs})")
    if not isinstance(row["prediction"], str):
        raise UserError(f"{where}: field 'prediction' must be a string (got {quote(row['prediction'])})")
    problem = bench.check_answer(row["answer"])
    if problem:
        raise UserError(f"{where}: field 'answer' {problem} (got {quote(row['answer'])})")
    extra = bench.restore_extra(row, extra, where)
    parsed = bench.parse(row["prediction"])
    return {**row, "extra": extra, "parsed": parsed, "correct": bench.correct(parsed, row["answer"])}


class Evaluator:
    """Runs benches on one model and writes results into one folder."""

    def __init__(self, loaded: LoadedModel, out_dir: Path) -> None:
        self.loaded = loaded
        self.max_image_pixels = loaded.recipe.data.max_image_pixels
        self.out_dir = out_dir

    def prompts(self, samples: list[Sample]) -> list[str]:
        return [self.loaded.prompt(s.question) for s in samples]

    def generate(self, samples: list[Sample], texts: list[str], max_new_tokens: int) -> list[str]:
        images = [to_rgb(s.image, s.id, self.max_image_pixels) for s in samples]
        return self.loaded.generate(images, texts, [s.question for s in samples], max_new_tokens)

    def _answer(self, bench, todo, prompts, identity, max_new, path, rows, bar, batch_size) -> None:
        """Answer ``todo`` in batches, appending each whole batch's rows to ``path`` (and ``rows``)."""
        with open_append(path) as handle:
            for start in range(0, len(todo), batch_size):
                batch = todo[start : start + batch_size]
                answered = []
                for sample, prediction in zip(
                    batch, self.generate(batch, [prompts[s.id] for s in batch], max_new), strict=True
                ):
                    parsed = bench.parse(prediction)
                    row = {
                        "id": sample.id,
                        "prompt": prompts[sample.id],
                        "prediction": prediction,
                        "parsed": parsed,
                        "answer": sample.answer,
                        "correct": bench.correct(parsed, sample.answer),
                        "extra": sample.extra,
                        "identity": identity,
                    }
                    handle.write(json.dumps(row) + "\n")
                    answered.append(row)
                handle.flush()
                os.fsync(handle.fileno())
                rows.extend(answered)  # only once it is on disk
                bar.update(len(batch))

    def run(
        self,
        bench: Bench,
        settings: EvalSettings,
        identity: dict[str, Any],
        done_rows: list[dict[str, Any]],
        ranks: Ranks | None = None,
        samples: list[Sample] | None = None,
    ) -> dict[str, Any] | None:
        """Answer and score ``bench``, continuing from ``done_rows`` (rows of the same ``identity``).

        In a data-parallel launch each rank answers its share of the samples into its own file; rank 0
        merges the files into one in sample order, scores once and returns the result (the others None).
        """
        from tqdm import tqdm

        ranks = ranks or Ranks()
        started = time.time()
        samples = list_samples(bench, settings) if samples is None else samples
        path = self.out_dir / SAMPLES.format(bench=bench.name)
        # rows kept from an earlier run are scored again: a resumed evaluation follows one rule
        done = {r["id"]: r for r in rescore(bench, done_rows, source=str(path))}
        max_new = identity["max_new_tokens"]
        prompts = dict(zip((s.id for s in samples), self.prompts(samples), strict=True))
        for sample_id, row in done.items():
            if sample_id in prompts and row.get("prompt") != prompts[sample_id]:
                raise UserError(
                    f"{path}: sample {quote(sample_id, bare=True)} was asked with another prompt "
                    f"({quote(row.get('prompt'))}, now {quote(prompts[sample_id])}); {WAY_OUT}"
                )
        ranks.barrier()  # every rank has read the earlier rows
        parts = sorted(self.out_dir.glob(PART.format(bench=bench.name, rank="*")))
        if ranks.main and (path.exists() or parts):  # keep only whole rows (drops a line torn by an interruption)
            write_in_order(path, samples, done)
            for part in parts:  # merged above
                part.unlink()
        ranks.barrier()
        todo = ranks.share([s for s in samples if s.id not in done])
        rows = [done[s.id] for s in samples if s.id in done]
        if ranks.world > 1:  # this rank's answers go to its own file; rank 0 merges them below
            path = self.out_dir / PART.format(bench=bench.name, rank=ranks.rank)
            rows = []
        desc = bench.name if ranks.world == 1 else f"{bench.name} (rank 0 of {ranks.world})"
        bar = tqdm(
            total=len(todo) + len(rows),
            initial=len(rows),
            unit="sample",
            desc=desc,
            dynamic_ncols=True,
            disable=not ranks.main,
        )
        try:
            self._answer(bench, todo, prompts, identity, max_new, path, rows, bar, settings.batch_size)
        except OSError as exc:  # a full disk: what was answered is whole and kept for --resume
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO):
                raise
            raise UserError(
                f"cannot write {path} ({exc.strerror}); the {len(rows)} samples answered so far are kept: "
                "free space and rerun the same command with --resume"
            ) from None
        bar.close()
        if ranks.world > 1:
            ranks.barrier()  # every rank has written its share
            if not ranks.main:
                return None
            rows = self._merge(bench, samples, done)
        elif done:  # resumed: the new rows were appended after the earlier ones
            write_in_order(path, samples, {**done, **{r["id"]: r for r in rows}})
        order = {s.id: i for i, s in enumerate(samples)}
        rows.sort(key=lambda r: order[r["id"]])
        bench.write_extra(rows, self.out_dir)
        result = {
            "metrics": bench.aggregate(rows),
            "samples": len(rows),
            "data": settings.data or bench.data or bench.name,
            "split": settings.split or bench.split,
            "limit": settings.limit,
            "max_new_tokens": max_new,
            "seconds": round(time.time() - started, 1),
            "identity": identity,
            "scoring": bench.rule,
        }
        result.update(bench.summary(rows))
        return result

    def _merge(self, bench: Bench, samples: list[Sample], done: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
        """Rank 0: the earlier rows and every rank's file, written as the bench's one samples file."""
        merged = dict(done)
        parts = sorted(self.out_dir.glob(PART.format(bench=bench.name, rank="*")))
        for part in parts:
            for row in read_rows(part):
                merged.setdefault(row["id"], row)
        write_in_order(self.out_dir / SAMPLES.format(bench=bench.name), samples, merged)
        for part in parts:
            part.unlink()
        return [merged[s.id] for s in samples if s.id in merged]


def list_samples(bench: Bench, settings: EvalSettings) -> list[Sample]:
    """The samples ``bench`` asks under ``settings`` (its data read, each row checked as it is read)."""
    samples = list(islice(bench.samples(settings.data, settings.split, settings.keep_wording), settings.limit))
    if not samples:
        raise UserError(f"bench {bench.name}: the data holds no samples")
    return samples


def write_in_order(path: Path, samples: list[Sample], rows: dict[str, dict[str, Any]]) -> None:
    """Write ``rows`` (by sample id) in the data's order; rows of samples not asked now (beyond
    ``--limit``) are kept after them."""
    asked = {s.id for s in samples}
    ordered = [rows[s.id] for s in samples if s.id in rows] + [r for i, r in rows.items() if i not in asked]
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in ordered))


def write_results(out_dir: Path, results: dict[str, Any]) -> Path:
    """Write ``results.json`` through a temporary file."""
    return write_text_atomic(out_dir / RESULTS, json.dumps(results, indent=2, sort_keys=True) + "\n")


def model_identity(source: ModelSource) -> dict[str, Any]:
    """The model's part of an evaluation's identity, from the model resolved once."""
    recipe = source.recipe
    return {
        "backbone": recipe.model.backbone,
        "base_model": recipe.model.name_or_path,
        "revision": recipe.model.revision,
        "adapter": None if source.adapter is None else str(source.adapter),
        "adapter_sha256": source.adapter_sha256,
        "method": "base" if source.base_only else recipe.method,
        "recipe_sha256": hashlib.sha256(recipe_config.dump(recipe).encode()).hexdigest(),
        # the parts a composite base names besides its LLM (openclip_vicuna's tower and projector)
        **{key: getattr(recipe.model, key) for key in BACKBONES.get(recipe.model.backbone).model_keys},
    }


def bench_identity(model: dict[str, Any], bench: Bench, settings: EvalSettings, template: str) -> dict[str, Any]:
    """Everything that changes a bench's answers or scores: the model (checksums, not paths), the
    data, the prompt wording and template, the decoding length and the metric. Batch size, limit
    and device are left out: they change neither (batch parity is tested)."""
    return {
        "model": {key: value for key, value in model.items() if key != "adapter"},
        "bench": bench.name,
        "data": settings.data or bench.data or bench.name,
        "split": settings.split or bench.split,
        "keep_wording": settings.keep_wording,
        "chat_template": template,
        "max_new_tokens": settings.max_new_tokens or bench.max_new_tokens,
        "metric": getattr(bench, "metric", None),
    }


def earlier_rows(
    out_dir: Path,
    identities: dict[str, dict[str, Any]],
    resume: bool,
    overwrite: bool,
    benches: dict[str, Bench],
    remove: bool = True,
) -> dict:
    """Check ``out_dir`` before anything is loaded or written; return each bench's rows to continue
    (each row's ``extra`` checked by its bench in ``benches``).

    A folder holding an evaluation is continued only with ``resume`` and only when every recorded
    identity (in ``results.json`` and in every per-sample row) equals this one; ``overwrite``
    removes the evaluation's own files (results.json, samples-*.jsonl) and nothing else (only where
    ``remove``: rank 0 of a data-parallel launch). The rows of an unmerged data-parallel evaluation's
    rank files count as answered, whatever the number of processes now.
    """
    if resume and overwrite:
        raise UserError("--resume and --overwrite: pass one (continue the evaluation, or replace it)")
    refuse_links(out_dir, OWN_ENTRIES)  # a folder handed over must not send a write elsewhere
    own = sorted(out_dir.glob(SAMPLES.format(bench="*"))) + [p for p in [out_dir / RESULTS] if p.is_file()]
    if not resume:
        if own and not overwrite:
            raise UserError(
                f"{out_dir}: already holds an evaluation ({own[0].name}); --resume continues it, "
                "--overwrite replaces it, or pass another --output-dir"
            )
        for path in own if remove else ():
            path.unlink()
        return {name: [] for name in identities}
    results = out_dir / RESULTS
    if results.is_file():
        recorded = read_record(results, WAY_OUT)
        if not isinstance(recorded.get("model"), dict):
            raise UserError(f"{results}: records no model to compare with; {WAY_OUT}")
        new_model = next(iter(identities.values()))["model"]
        old_model = {key: value for key, value in recorded["model"].items() if key != "adapter"}
        check_same(str(results), "evaluation", old_model, new_model, WAY_OUT)
        for name, entry in recorded.get("benches", {}).items():
            if name in identities:
                check_same(f"{results} ({name})", "evaluation", entry.get("identity"), identities[name], WAY_OUT)
    done = {}
    for name, identity in identities.items():
        rows, seen = [], set()
        files = [out_dir / SAMPLES.format(bench=name), *sorted(out_dir.glob(PART.format(bench=name, rank="*")))]
        for path in files:
            for line, row in iter_numbered(path):
                if "identity" not in row:
                    raise UserError(f"{path}: line {line} records no evaluation identity (an older m2pt); {WAY_OUT}")
                check_same(f"{path} (line {line})", "evaluation", row["identity"], identity, WAY_OUT)
                extra = row.get("extra")
                benches[name].check_extra(extra if isinstance(extra, dict) else {}, f"{path} (line {line})")
                if row.get("id") not in seen:
                    seen.add(row.get("id"))
                    rows.append(row)
        done[name] = rows
    return done


def format_table(results: dict[str, Any]) -> str:
    """The table ``m2pt eval`` prints: bench, metric, value (per-subtask lines left to results.json)."""
    lines = [f"{'bench':<10} {'metric':<32} {'value':>10}"]
    for bench, entry in results["benches"].items():
        for key, value in BENCHES.get(bench).headline(entry["metrics"]).items():
            lines.append(f"{bench:<10} {key:<32} {value:>10.2f}")
        lines.append(f"{bench:<10} {'samples':<32} {entry['samples']:>10}")
        if entry.get("missing_subtasks"):
            lines.append(f"{bench:<10} missing subtasks: {', '.join(entry['missing_subtasks'])}")
    return "\n".join(lines)


def evaluate(
    model_spec: dict[str, Any],
    bench_names: list[str],
    settings: EvalSettings,
    out_dir: Path,
    resume: bool,
    device: str = "cpu",
    overwrite: bool = False,
) -> dict[str, Any] | None:
    """Load the model of ``model_spec`` (recipe, adapter, base) and run every bench into ``out_dir``.

    ``resume`` continues an evaluation in ``out_dir`` only if it is the same one (``earlier_rows``).
    Under torchrun or accelerate the samples are shared among the processes; rank 0 merges, scores,
    writes ``results.json`` and returns the results (the other ranks None).
    """
    from m2pt_cli.model_source import resolve_model_source

    started = time.time()
    benches = [get_bench(name, settings) for name in bench_names]
    source = resolve_model_source(
        model_spec.get("adapter"), model_spec.get("recipe"), base_only=model_spec.get("base", False)
    )
    recipe = source.recipe
    identity = model_identity(source)
    template = recipe.model.chat_template
    identities = {bench.name: bench_identity(identity, bench, settings, template) for bench in benches}
    ranks = join(device)
    try:
        with locks.hold(out_dir):  # one writer per evaluation folder (rank 0 holds it for a launch)
            by_name = {bench.name: bench for bench in benches}
            done = earlier_rows(out_dir, identities, resume, overwrite, by_name, remove=ranks.main)
            ranks.barrier()  # what --overwrite replaces is gone before any rank writes
            # the data first: a bad row is reported before the model is loaded
            listed = {bench.name: list_samples(bench, settings) for bench in benches}
            loaded = source.load(device=device)
            out_dir.mkdir(parents=True, exist_ok=True)
            evaluator = Evaluator(loaded, out_dir)
            previous = read_record(out_dir / RESULTS, WAY_OUT) if resume and (out_dir / RESULTS).is_file() else {}
            results = {
                "m2pt_version": __version__,
                "model": identity,
                "decoding": {
                    "do_sample": False,
                    "num_beams": 1,
                    "batch_size": settings.batch_size,
                    "padding": "left",
                    "chat_template": recipe.model.chat_template,
                    "keep_wording": settings.keep_wording,
                },
                "benches": dict(previous.get("benches", {})),
            }
            for bench in benches:
                entry = evaluator.run(
                    bench, settings, identities[bench.name], done[bench.name], ranks, listed[bench.name]
                )
                if not ranks.main:
                    continue
                results["benches"][bench.name] = entry
                results["metrics"] = {name: entry["metrics"] for name, entry in results["benches"].items()}
                write_results(out_dir, {**results, "wall_seconds": round(time.time() - started, 1)})
            if not ranks.main:
                return None
            results["wall_seconds"] = round(time.time() - started, 1)
            results["processes"] = ranks.world
            write_results(out_dir, results)
            return results
    finally:
        ranks.leave()


def rescore_file(bench_name: str, predictions: Path, settings: EvalSettings, out_dir: Path | None) -> dict[str, Any]:
    """Score a per-sample JSONL again without a model."""
    bench = get_bench(bench_name, settings)
    if not predictions.is_file():
        raise UserError(f"--predictions: file {predictions} does not exist")
    rows = [  # scored as read: the first bad row stops the command before the next line is read
        rescore_row(bench, row, f"--predictions: line {number} of {predictions}")
        for number, row in iter_numbered(predictions)
    ]
    if not rows:
        raise UserError(f"--predictions: {predictions} holds no rows")
    entry = {"metrics": bench.aggregate(rows), "samples": len(rows), "data": str(predictions), "scoring": bench.rule}
    entry.update(bench.summary(rows))
    results = {
        "m2pt_version": __version__,
        "rescored": str(predictions),
        "benches": {bench.name: entry},
        "metrics": {bench.name: entry["metrics"]},
    }
    if out_dir is not None:
        with locks.hold(out_dir):
            refuse_links(out_dir, OWN_ENTRIES)
            bench.write_extra(rows, out_dir)
            write_results(out_dir, results)
    return results
