"""Time to the first step and memory at the first step as the training data grows (issue #38):

    python -m tests.cli.data_scale --sizes 10000 100000 665000 --out /tmp/data-scale

For each size it writes that many synthetic LLaVA-format records (``llava_v1_5_mix665k``'s shape:
one to three question/answer turns, one record in 16 text-only) over a pool of 64 real images
(scikit-learn's handwritten digits as PNG files), then trains the demo model one step on them:
the first start (an empty cache: check and encode, ``data.num_proc`` processes), the second start
(a new run folder reading the cache), a first start with one encoding process (the speed-up of
two), and the second start under ``torchrun`` with two processes. Every figure comes from the
run's ``summary.json`` (``timings``; memory of rank 0). Not a test: figures depend on the machine
and its load; the Markdown table names the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

QUESTIONS = [
    "What is shown in the image?",
    "Which digit is written here?",
    "Describe the picture in one sentence.",
    "Is the stroke thick or thin?",
    "What could this image be used for?",
]
ANSWERS = ["A handwritten digit.", "It looks like a seven.", "A grey digit on a white background.", "Thin.", "OCR."]


def write_images(folder: Path, count: int = 64) -> list[str]:
    """``count`` real images: scikit-learn's digits, 32 x 32 PNG."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, pixels in enumerate(load_digits().images[:count]):
        gray = (255 - pixels * (255 / 16)).astype(np.uint8)
        name = f"digit-{i}.png"
        Image.fromarray(gray).convert("RGB").resize((32, 32), Image.NEAREST).save(folder / name)
        names.append(name)
    return names


def write_records(path: Path, count: int, images: list[str], seed: int = 0) -> None:
    """``count`` LLaVA records, written as one JSON list a record at a time."""
    rng = random.Random(seed)
    with open(path, "w") as handle:
        handle.write("[")
        for i in range(count):
            turns = []
            for _ in range(rng.choice((1, 1, 2, 3))):
                question = rng.choice(QUESTIONS) + " Please answer briefly." * rng.randrange(3)
                turns.append({"from": "human", "value": question})
                turns.append({"from": "gpt", "value": rng.choice(ANSWERS) + " Really." * rng.randrange(4)})
            record = {"id": f"synthetic-{i}", "conversations": turns}
            if i % 16:
                record["image"] = images[i % len(images)]
                turns[0]["value"] = "<image>\n" + turns[0]["value"]
            handle.write(("," if i else "") + json.dumps(record))
        handle.write("]")


def recipe_for(data: Path, images: Path, folder: Path) -> Path:
    """The demo recipe, one training step on ``data``, no held-out set."""
    from m2pt_cli import config

    demo = yaml.safe_load(config.dump(config.load("demo")))
    demo["data"].update(sources=[{"format": "llava_json", "path": str(data), "image_folder": str(images)}], eval_size=0)
    demo["train"].update(max_steps=1, global_batch_size=8, per_device_batch_size=4, save_steps=1000, logging_steps=1)
    path = folder / "scale.yaml"
    path.write_text(yaml.safe_dump(demo, sort_keys=False))
    return path


def train(recipe: Path, out: Path, cache: Path, num_proc: int, ranks: int = 1) -> dict:
    """One ``m2pt train`` start; its timings, the wall time and how the data was found."""
    env = {**os.environ, "M2PT_CACHE": str(cache), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = ["-m", "m2pt_cli", "train", str(recipe), f"data.num_proc={num_proc}", "--output-dir", str(out)]
    if ranks > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks)]
        command = [*launcher, "--master_port", "29561", *command]
    else:
        command = [sys.executable, *command]
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode:
        raise RuntimeError(result.stderr[-3000:])
    summary = json.loads((out / "summary.json").read_text())
    log = (out / "train.log").read_text()
    return {
        **summary["timings"],
        "wall_s": round(wall, 1),
        "encoded": log.count("records encoded in"),
        "from_cache": log.count("records from the cache"),
    }


def measure(size: int, work: Path, one_process: bool, two_ranks: bool) -> dict:
    folder = work / f"n{size}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    images = folder / "images"
    data = folder / "records.json"
    write_records(data, size, write_images(images))
    recipe = recipe_for(data, images, folder)
    cache = folder / "cache"
    row: dict = {"records": size, "json_mb": round(data.stat().st_size / 2**20, 1)}
    row["first"] = train(recipe, folder / "first", cache, num_proc=2)
    row["second"] = train(recipe, folder / "second", cache, num_proc=2)
    if two_ranks:
        row["second_2_ranks"] = train(recipe, folder / "second-2", cache, num_proc=2, ranks=2)
    if one_process:
        row["first_1_process"] = train(recipe, folder / "first-1", folder / "cache-1", num_proc=1)
    shutil.rmtree(folder / "cache-1", ignore_errors=True)
    print(json.dumps(row), flush=True)
    return row


def table(rows: list[dict], machine: str) -> str:
    lines = [
        f"Machine: {machine}. Demo model, one step, batch 4 per process; times from the loaded model "
        "to the first step (data check/encode or cache read included); RSS of rank 0 at the first step.",
        "",
        "| records | JSON | first start: to 1st step | data (encode, 2 proc.) | encode, 1 proc. | speed-up "
        "| second start: to 1st step | 2 ranks, second start | RSS at 1st step (first / second) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        one = r.get("first_1_process")
        speed = f"{one['data_s'] / r['first']['data_s']:.2f}x" if one else "not run"
        two = r.get("second_2_ranks")
        one_s = f"{one['data_s']:.1f} s" if one else "not run"
        two_s = f"{two['to_first_step_s']:.1f} s" if two else "not run"
        first, second = r["first"], r["second"]
        lines.append(
            f"| {r['records']:,} | {r['json_mb']} MB | {first['to_first_step_s']:.1f} s | {first['data_s']:.1f} s "
            f"| {one_s} | {speed} | {second['to_first_step_s']:.1f} s | {two_s} "
            f"| {first['rss_at_first_step_mb']:.0f} / {second['rss_at_first_step_mb']:.0f} MB |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--one-process-up-to", type=int, default=100_000, help="also time 1 encoding process")
    parser.add_argument("--two-ranks", action="store_true", help="also a second start under torchrun, 2 processes")
    parser.add_argument("--work", type=Path, default=Path("/tmp/m2pt-data-scale"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows = [measure(n, args.work, n <= args.one_process_up_to, args.two_ranks) for n in args.sizes]
    machine = f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), {platform.system()}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "data-scale.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    (args.out / "data-scale.md").write_text(table(rows, machine))
    print(table(rows, machine))


if __name__ == "__main__":
    main()
