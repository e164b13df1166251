"""Throughput and time to first token of ``m2pt serve`` (the table of docs/performance.md), on loopback:

    python -m tests.cli.serve_bench ADAPTER --runs 3 --out bench.json

Each run starts a server, then measures requests per second at concurrency 1 and 8 (``--requests``
well-formed requests a round, median of 3 rounds) and the time to the first streamed token of 20
streamed requests sent one at a time, with the demo bench's digit images and questions, through the
client of ``m2pt bench --suite gpu`` (``m2pt_cli.benchmark.serving``). Not a test: the figures depend
on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from m2pt_cli.benchmark.serving import requests_per_second, serving, time_to_first_token
from tests.cli.soak import data_uri, digit_cases, request


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("adapter", type=Path)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    log = Path(os.environ.get("TMPDIR", "/tmp")) / "m2pt-bench-serve.log"
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the server's torch threads, as the docs' figures had them
    bodies = [request(data_uri(png), question) for png, question in digit_cases(16)]
    runs = []
    for _ in range(args.runs):
        with serving(args.adapter, "cpu", log, max_batch_size=8, queue_size=64) as url:
            measured = requests_per_second(url, (1, 8), args.requests, bodies)
            measured.update(time_to_first_token(url, bodies, 20))
        runs.append(measured)
        print(json.dumps(runs[-1]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(runs, indent=2) + "\n")


if __name__ == "__main__":
    main()
