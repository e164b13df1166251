#!/usr/bin/env python3
"""Mutation check: deliberate defects that the tests of the code they break must catch.

Each mutant is a text patch to m2pt_cli/prompts.py or a backbone's prompt site (run against the
mechanism tests, per backbone case), or to a module with tests of its own: the scorers (their
differential tests) and the adapter reader (the export and untrusted-file tests), run as a whole
("module" column). The script copies the
working tree to temporary folders, one per worker (the checkout is never modified: other work in it
never sees a mutated file), checks that the mechanism tests pass there unmutated, then applies one
mutant at a time to a copy and runs the mechanism tests of every backbone case the mutant can reach, in one pytest
process, stopping a case at its first failing test. It prints a table mutant x case -> killed or
SURVIVED and the count killed per case, and exits 1 if any mutant survives on any case (or a patch
no longer applies: update the mutant with the code).

Usage: python .ci/mutants.py [--only NAME ...] [--jobs N] [--list] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from queue import Empty, Queue

REPO = Path(__file__).resolve().parents[1]
CASES = ("llava", "instructblip", "instructblip_opt", "openclip_vicuna")
MODULE = "module"  # the case of a mutant judged by a module's own tests, all of them
# The mechanism tests, in the order that kills most mutants soonest (the reference tests come first).
TESTS = (
    "tests/m2pt_cli/test_prompts.py",
    "tests/m2pt_cli/test_liveness.py",
    "tests/m2pt_cli/test_position_ids.py",
    "tests/m2pt_cli/test_hf_conventions.py",
)
SCORER_TESTS = ("tests/benches/test_scorers.py", "tests/benches/test_reference_parity.py")
ADAPTER_TESTS = ("tests/m2pt_cli/test_export.py", "tests/cli/test_untrusted_code.py")
PROMPTS = "m2pt_cli/prompts.py"


@dataclass(frozen=True)
class Mutant:
    name: str
    defect: str
    path: str
    patches: tuple[tuple[str, str], ...]  # (original text, replacement), each found exactly once
    cases: tuple[str, ...] = CASES  # the cases whose code the mutant touches, or (MODULE,)
    tests: tuple[str, ...] = TESTS  # the test files that must catch it


MUTANTS = (
    Mutant(
        "vision-layer-swap",
        "a layer's visual prompts used for another layer",
        PROMPTS,
        (("tokens = prompts[slot].to(hidden.dtype)", "tokens = prompts[(slot + 1) % len(layers)].to(hidden.dtype)"),),
    ),
    Mutant(
        "text-layer-swap",
        "a layer's textual prompts used for another layer",
        PROMPTS,
        (("tokens = step.prompts[slot].unsqueeze(0)", "tokens = step.prompts[(slot + 1) % len(layers)].unsqueeze(0)"),),
    ),
    Mutant(
        "vision-not-dropped",
        "visual prompts not dropped after their block (only after the last chosen one)",
        PROMPTS,
        (
            (
                "        def drop_prompts(module, args, kwargs, output):\n",
                "        def drop_prompts(module, args, kwargs, output, slot=slot):\n"
                "            if slot < len(layers) - 1:\n"
                "                return output\n",
            ),
        ),
    ),
    Mutant(
        "vision-drop-wrong-positions",
        "the first Nv tokens dropped after a block instead of the prompts",
        PROMPTS,
        (("_first(output)[:, :-n_prompts]", "_first(output)[:, n_prompts:]"),),
    ),
    Mutant(
        "projector-reads-prompts",
        "visual prompts put in front but the tail dropped: the projector reads prompt outputs",
        PROMPTS,
        (("torch.cat([hidden, tokens], dim=1)", "torch.cat([tokens, hidden], dim=1)"),),
    ),
    Mutant(
        "vision-prompts-scaled",
        "visual prompts rescaled inside the hook",
        PROMPTS,
        (("tokens = prompts[slot].to(hidden.dtype)", "tokens = (2 * prompts[slot]).to(hidden.dtype)"),),
    ),
    Mutant(
        "positions-ignore-padding",
        "real tokens not at positions Nt.. under padding (positions counted over pad columns)",
        PROMPTS,
        (
            (
                "return (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -step_tokens:]",
                "return torch.arange(mask.shape[1] - step_tokens, mask.shape[1], device=device).expand(batch, -1)",
            ),
        ),
    ),
    Mutant(
        "positions-from-zero",
        "real tokens at positions 0.. (on top of the prompts) instead of Nt..",
        PROMPTS,
        (
            (
                "positions = _positions(mask, past, step_tokens, batch, embeds.device)",
                "positions = (_positions(mask, past, step_tokens, batch, embeds.device) - n_prompts).clamp(min=0)",
            ),
        ),
    ),
    Mutant(
        "caller-positions-ignored",
        "a caller's position_ids silently replaced by the mask's",
        PROMPTS,
        (('given = kwargs.get("position_ids")', "given = None"),),
    ),
    Mutant(
        "caller-positions-not-shifted",
        "a caller's position_ids not shifted by Nt",
        PROMPTS,
        (("return given + n_prompts", "return given"),),
    ),
    Mutant(
        "zero-prompts-rewrite-call",
        "with both prompt lengths 0 the call is still rewritten (mask made, positions replaced)",
        PROMPTS,
        (("if not n_prompts:  # nothing to add", "if n_prompts < 0:  # nothing to add"),),
    ),
    Mutant(
        "unchosen-layers-see-prompts",
        "prompt columns visible to decoder layers that are not chosen",
        PROMPTS,
        (
            (
                "allowed = (kv[None, :] <= query) & ((kv[None, :] >= n_prompts) | (kv[None, :] == query))",
                "allowed = kv[None, :] <= query",
            ),
        ),
    ),
    Mutant(
        "prompt-columns-masked",
        "prompt columns masked out of the attention mask (no layer sees its prompts)",
        PROMPTS,
        (
            (
                "torch.cat([mask.new_ones(batch, n_prompts), mask], dim=1)",
                "torch.cat([mask.new_zeros(batch, n_prompts), mask], dim=1)",
            ),
        ),
    ),
    Mutant(
        "text-prompts-scaled",
        "textual prompts rescaled inside the hook",
        PROMPTS,
        (
            (
                "cast = prompts.to(embeds.dtype) if first else None",
                "cast = (2 * prompts).to(embeds.dtype) if first else None",
            ),
        ),
    ),
    Mutant(
        "prompts-reinserted-at-decode",
        "prompts re-inserted at every decode step (each forward treated as the first)",
        PROMPTS,
        (("        first = past == 0\n", "        first = True\n"),),
    ),
    Mutant(
        "prompt-rows-in-logits",
        "the prompt rows kept in the output (the last Nt real rows dropped instead)",
        PROMPTS,
        (("output.last_hidden_state[:, n_prompts:]", "output.last_hidden_state[:, :-n_prompts]"),),
    ),
    Mutant(
        "llava-feature-layer-unprompted",
        "llava: the block the projector reads left out of the prompted layers",
        "backbones/llava.py",
        (("return tuple(range(last, n_layers))", "return tuple(range(last - 1, n_layers))"),),
        ("llava",),
    ),
    Mutant(
        "instructblip-last-block-unprompted",
        "instructblip: the ViT's last block (read by the Q-Former) left out of the towers' blocks",
        "backbones/instructblip.py",
        (("Tower(blocks=model.vision_model.encoder.layers,", "Tower(blocks=model.vision_model.encoder.layers[:-1],"),),
        ("instructblip", "instructblip_opt"),
    ),
    Mutant(
        "openclip-feature-layer-unprompted",
        "openclip_vicuna: the block the projector reads counted as unused",
        "backbones/openclip_vicuna.py",
        (
            (
                "unused = tuple(range(model.feature_index + 1, len(blocks)))",
                "unused = tuple(range(model.feature_index, len(blocks)))",
            ),
        ),
        ("openclip_vicuna",),
    ),
    Mutant(
        "openclip-projector-reads-wrong-block",
        "openclip_vicuna: the projector reads the block before the feature layer",
        "backbones/openclip_vicuna.py",
        (("indices=[self.feature_index],", "indices=[self.feature_index - 1],"),),
        ("openclip_vicuna",),
    ),
    # the scorers: each defect changes a score that the differential tests compare with a reference
    Mutant(
        "mme-parse-head",
        "MME: yes/no searched in the first 5 characters instead of 4",
        "m2pt_cli/benches/mme.py",
        (("head = text[:4]", "head = text[:5]"),),
        (MODULE,),
        SCORER_TESTS,
    ),
    Mutant(
        "mme-acc-plus-any",
        "MME: acc+ counts an image with either question right",
        "m2pt_cli/benches/mme.py",
        (("sum(all(scores) for scores in images.values())", "sum(any(scores) for scores in images.values())"),),
        (MODULE,),
        SCORER_TESTS,
    ),
    Mutant(
        "pope-not-ignored",
        "POPE: the word 'not' no longer means no",
        "m2pt_cli/benches/pope.py",
        (('"No" in words or "not" in words or "no" in words', '"No" in words or "no" in words'),),
        (MODULE,),
        SCORER_TESTS,
    ),
    Mutant(
        "vqa-no-leave-one-out",
        "VQA accuracy over all ten answers instead of the leave-one-out subsets",
        "m2pt_cli/benches/vqa_eval.py",
        (("sum(a == parsed for a in gts[:i] + gts[i + 1 :])", "sum(a == parsed for a in gts)"),),
        (MODULE,),
        SCORER_TESTS,
    ),
    Mutant(
        "vqa-prediction-unnormalized",
        "VQA: the human answers not normalized before matching",
        "m2pt_cli/benches/vqa_eval.py",
        (("gts = [normalize_vqa(a) for a in answers]", "gts = list(answers)"),),
        (MODULE,),
        SCORER_TESTS,
    ),
    # the adapter reader: each defect lets a bad adapter through or reads the wrong one
    Mutant(
        "adapter-checksum-unchecked",
        "adapter: a tensor file that does not match its recorded checksum is read",
        "m2pt_cli/adapter.py",
        (('if digest != meta.get("sha256"):', "if False:"),),
        (MODULE,),
        ADAPTER_TESTS,
    ),
    Mutant(
        "adapter-format-unchecked",
        "adapter: any format_version accepted",
        "m2pt_cli/adapter.py",
        (('meta.get("format_version") != FORMAT_VERSION', "not meta"),),
        (MODULE,),
        ADAPTER_TESTS,
    ),
    Mutant(
        "adapter-checkpoints-as-text",
        "adapter: checkpoints ordered by name (checkpoint-10 before checkpoint-8)",
        "m2pt_cli/adapter.py",
        (('key=lambda p: int(p.name.split("-")[-1])', "key=lambda p: p.name"),),
        (MODULE,),
        ADAPTER_TESTS,
    ),
    Mutant(
        "adapter-oldest-checkpoint",
        "adapter: a run without adapter/ resolves to its oldest checkpoint, not its newest",
        "m2pt_cli/adapter.py",
        (("return checkpoints[-1]", "return checkpoints[0]"),),
        (MODULE,),
        ADAPTER_TESTS,
    ),
)

PLUGIN = '''
"""Loaded by .ci/mutants.py: run only the chosen cases; stop a case at its first failure; report."""
import json
import os
from pathlib import Path

import pytest

CASES = set(os.environ["M2PT_MUTANT_CASES"].split(","))
REPORT = Path(os.environ["M2PT_MUTANT_REPORT"])
ROOT = Path(os.environ["M2PT_MUTANT_ROOT"])
case_of, killed, ran = {}, {}, {}


def pytest_configure(config):
    import m2pt_cli
    import m2pt_cli.backbones

    for module in (m2pt_cli, m2pt_cli.backbones):  # the copy, never the checkout
        assert Path(module.__file__).resolve().is_relative_to(ROOT), module.__file__


def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        name = callspec.params["case"] if callspec and "case" in callspec.params else "module"
        (keep if name in CASES else drop).append(item)
        if name in CASES:
            case_of[item.nodeid] = name
    items[:] = keep
    config.hook.pytest_deselected(items=drop)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    if case_of.get(item.nodeid) in killed:  # skipped before its fixtures are set up, so teardown stays exact
        pytest.skip("case already killed")


def pytest_runtest_logreport(report):
    name = case_of.get(report.nodeid)
    if name is None:
        return
    if report.when == "call" or report.failed:
        ran[name] = ran.get(name, 0) + 1
    if report.failed and name not in killed:
        line = (report.longreprtext or "").strip().splitlines()
        reason = next((text for text in line if text.startswith("E ")), line[-1] if line else "")
        killed[name] = {"test": report.nodeid.split("::")[-1], "reason": reason[:160]}


def pytest_sessionfinish(session, exitstatus):
    REPORT.write_text(json.dumps({"killed": killed, "ran": ran}))
'''


# pyproject.toml's package-dir: these folders install as sub-packages of m2pt_cli. The checkout's
# editable install maps them to the checkout, so a copy must hold them where Python looks first.
INSTALLED_AS = {"backbones": "m2pt_cli/backbones", "recipes": "m2pt_cli/bundled_recipes"}


def copy_tree(target: Path) -> None:
    """The checkout's files (tracked and untracked, not ignored) copied to ``target``, with the
    folders of ``INSTALLED_AS`` also reachable where the package installs them (links)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, check=False
    )
    if listed.returncode == 0:
        for name in filter(None, listed.stdout.decode().split("\0")):
            source = REPO / name
            if source.is_file():
                (target / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target / name)
    else:  # not a git checkout
        ignore = shutil.ignore_patterns(".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", "runs")
        shutil.copytree(REPO, target, ignore=ignore, dirs_exist_ok=True)
    for folder, package in INSTALLED_AS.items():
        link = target / package
        link.symlink_to(os.path.relpath(target / folder, link.parent), target_is_directory=True)


def mutated(text: str, mutant: Mutant) -> str:
    for old, new in mutant.patches:
        count = text.count(old)
        if count != 1:
            raise SystemExit(
                f"mutant {mutant.name}: {old!r} occurs {count} times in {mutant.path} (expected once); "
                "update .ci/mutants.py with the code"
            )
        text = text.replace(old, new)
    return text


def run_tests(root: Path, cases: tuple[str, ...], tests: tuple[str, ...], label: str) -> dict:
    report = root / f".mutant-report-{label}.json"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
        "PYTHONDONTWRITEBYTECODE": "1",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        "M2PT_MUTANT_CASES": ",".join(cases),
        "M2PT_MUTANT_REPORT": str(report),
        "M2PT_MUTANT_ROOT": str(root),
    }
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-p",
        "_mutant_plugin",
        "-n",
        "0",  # one process, no pytest-xdist workers: the plugin skips a killed case's remaining tests
        "--basetemp",
        str(root / f".pytest-{label}"),
        *tests,
    ]
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
    if not report.exists():
        raise SystemExit(f"{label}: pytest wrote no report (exit {result.returncode}):\n{result.stdout[-3000:]}")
    return json.loads(report.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", help="run these mutants only")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copies (their path is printed)")
    parser.add_argument(
        "--jobs", type=int, default=min(2, os.cpu_count() or 1), help="mutants run at once (default: 2, or 1 CPU)"
    )
    args = parser.parse_args()
    mutants = [m for m in MUTANTS if not args.only or m.name in args.only]
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:38} {m.path:30} {m.defect}")
        return 0
    if args.only and len(mutants) != len(args.only):
        raise SystemExit(f"unknown mutant among {args.only}; see --list")

    start = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="m2pt-mutants-"))
    workers = [root / f"w{i}" for i in range(max(1, min(args.jobs, len(mutants))))]
    try:
        originals = {m.path: (REPO / m.path).read_text() for m in mutants}
        for m in mutants:
            mutated(originals[m.path], m)  # every patch applies, before anything runs
        for worker in workers:  # one copy per worker: a worker mutates only its own copy
            copy_tree(worker)
            (worker / "_mutant_plugin.py").write_text(PLUGIN)

        suites: dict[tuple[str, ...], set[str]] = {}
        for m in mutants:
            suites.setdefault(m.tests, set()).update(m.cases)
        with ThreadPoolExecutor(len(workers)) as pool:  # each suite passes unmutated first, side by side
            baselines = [
                pool.submit(run_tests, workers[n % len(workers)], tuple(sorted(cases)), tests, f"baseline{n}")
                for n, (tests, cases) in enumerate(suites.items())
            ]
            for (tests, cases), done in zip(suites.items(), baselines, strict=True):
                baseline = done.result()
                if baseline["killed"] or set(baseline["ran"]) != cases:
                    print(f"{' '.join(tests)} must pass on the unmutated code first:", json.dumps(baseline, indent=1))
                    return 1
                print(f"baseline: {' '.join(tests)} pass ({baseline['ran']}) in {time.monotonic() - start:.0f} s")

        results: dict[str, dict] = {}
        queue: Queue[Mutant] = Queue()
        for m in mutants:
            queue.put(m)

        def work(copy: Path) -> None:
            while True:
                try:
                    m = queue.get_nowait()
                except Empty:
                    return
                began, target = time.monotonic(), copy / m.path
                try:
                    target.write_text(mutated(originals[m.path], m))
                    results[m.name] = run_tests(copy, m.cases, m.tests, m.name)
                finally:
                    target.write_text(originals[m.path])
                states = " ".join(f"{c}={'killed' if c in results[m.name]['killed'] else 'SURVIVED'}" for c in m.cases)
                print(f"  {m.name}: {states} ({time.monotonic() - began:.0f} s)", flush=True)

        with ThreadPoolExecutor(len(workers)) as pool:
            for done in [pool.submit(work, worker) for worker in workers]:
                done.result()
    finally:
        if args.keep:
            print(f"copies kept under {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    width = max(len(m.name) for m in mutants)
    columns = CASES + (MODULE,)
    print()
    print(f"{'mutant':{width}}  " + "  ".join(f"{c:16}" for c in columns))
    survivors = 0
    for m in mutants:
        cells = []
        for c in columns:
            if c not in m.cases:
                cells.append("-")
            elif c in results[m.name]["killed"]:
                cells.append("killed")
            else:
                cells.append("SURVIVED")
                survivors += 1
        print(f"{m.name:{width}}  " + "  ".join(f"{cell:16}" for cell in cells))
    counts = []
    for c in columns:
        applicable = [m for m in mutants if c in m.cases]
        dead = sum(c in results[m.name]["killed"] for m in applicable)
        counts.append(f"{dead}/{len(applicable)}")
    print(f"{'killed':{width}}  " + "  ".join(f"{count:16}" for count in counts))
    print()
    print("first failing test per mutant and case:")
    for m in mutants:
        for c, info in results[m.name]["killed"].items():
            print(f"  {m.name} [{c}]: {info['test']}: {info['reason']}")
    print(f"\n{len(mutants)} mutants, {survivors} survived, {time.monotonic() - start:.0f} s")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
