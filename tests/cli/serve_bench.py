"""Throughput and time to first token of ``m2pt serve`` (the table of docs/performance.md), on loopback:

    python -m tests.cli.serve_bench ADAPTER --runs 3 --out bench.json

Each run starts a server, then measures requests per second at concurrency 1 and 8 (``--requests``
well-formed requests a round, median of 3 rounds) and the time to the first streamed token of 20
streamed requests sent one at a time. Not a test: the figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

from tests.cli.soak import data_uri, digit_cases, request


def _post(host: str, port: int, body: dict, first_token: bool = False) -> float:
    """Seconds to the whole answer (or to the first content event when ``first_token``)."""
    connection = http.client.HTTPConnection(host, port, timeout=120)
    started = time.perf_counter()
    try:
        connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            raise RuntimeError(f"{response.status}: {response.read()[:200]!r}")
        if not first_token:
            response.read()
            return time.perf_counter() - started
        for line in response.fp:
            if line.startswith(b"data: {") and b'"content": "' in line and b'"content": ""' not in line:
                return time.perf_counter() - started
        raise RuntimeError("no content event")
    finally:
        connection.close()


def measure(url: str, health, requests: int = 64) -> dict:
    parts = urlsplit(url)
    host, port = parts.hostname, parts.port
    bodies = [request(data_uri(png), question) for png, question in digit_cases(16)]
    out: dict = {}
    for concurrency in (1, 8):
        rates, per_batch = [], []
        for _ in range(3):
            before = health()
            started = time.perf_counter()
            with ThreadPoolExecutor(concurrency) as pool:
                list(pool.map(lambda k: _post(host, port, bodies[k % len(bodies)]), range(requests)))
            rates.append(requests / (time.perf_counter() - started))
            after = health()
            per_batch.append((after["answered"] - before["answered"]) / max(1, after["batches"] - before["batches"]))
        out[f"rps_c{concurrency}"] = round(statistics.median(rates), 1)
        out[f"rows_per_batch_c{concurrency}"] = round(statistics.median(per_batch), 1)
    ttft = sorted(_post(host, port, {**bodies[k % 16], "stream": True}, True) for k in range(20))
    out["ttft_ms_median"] = round(1000 * statistics.median(ttft), 1)
    out["ttft_ms_p90"] = round(1000 * ttft[17], 1)
    return out


def main() -> None:
    from tests.cli.serving import Server

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("adapter", type=Path)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    log = Path(os.environ.get("TMPDIR", "/tmp")) / "m2pt-bench-serve.log"
    runs = []
    for _ in range(args.runs):
        with Server(args.adapter, log=log) as server:
            runs.append(measure(server.url, server.health, args.requests))
        print(json.dumps(runs[-1]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(runs, indent=2) + "\n")


if __name__ == "__main__":
    main()
