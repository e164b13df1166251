"""Requests per second of a real ``m2pt serve`` process on loopback, at several concurrencies."""

from __future__ import annotations

import base64
import http.client
import io
import json
import re
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from m2pt_cli.benchmark.memory import child_env
from m2pt_cli.benchmark.methods import noise_images
from m2pt_cli.benchmark.timing import percentile

CONCURRENCY = (1, 8, 32)

QUESTIONS = ("Describe the image.", "What is in the picture?", "Is there a dog? Answer yes or no.")


def png_data_uris(count: int) -> list[str]:
    """``count`` seeded noise images as PNG data URIs, as a client sends them."""
    uris = []
    for image in noise_images(count, seed=2):
        out = io.BytesIO()
        image.save(out, "PNG")
        uris.append("data:image/png;base64," + base64.b64encode(out.getvalue()).decode())
    return uris


def chat_request(image_uri: str, question: str, max_tokens: int) -> dict[str, Any]:
    parts = [{"type": "image_url", "image_url": {"url": image_uri}}, {"type": "text", "text": question}]
    return {"messages": [{"role": "user", "content": parts}], "max_tokens": max_tokens}


def noise_requests(max_tokens: int, count: int = 16) -> list[dict[str, Any]]:
    """``count`` chat requests, each a seeded noise image and one of ``QUESTIONS``."""
    uris = png_data_uris(count)
    return [chat_request(uri, QUESTIONS[i % len(QUESTIONS)], max_tokens) for i, uri in enumerate(uris)]


def post(url: str, body: dict[str, Any], first_token: bool = False, timeout: float = 600) -> float:
    """Seconds to the whole answer of one chat completion, or with ``first_token`` (the request is
    then streamed) to its first event that carries text; a status other than 200 raises."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    body = {**body, "stream": True} if first_token else body
    started = time.perf_counter()
    try:
        headers = {"Content-Type": "application/json"}
        connection.request("POST", "/v1/chat/completions", json.dumps(body), headers)
        response = connection.getresponse()
        if response.status != 200:
            raise RuntimeError(f"m2pt serve answered {response.status}: {response.read()[:200]!r}")
        if not first_token:
            response.read()
            return time.perf_counter() - started
        for line in response.fp:
            if line.startswith(b"data: {") and _carries_text(line):
                return time.perf_counter() - started
        raise RuntimeError("m2pt serve streamed no text")
    finally:
        connection.close()


def _carries_text(event: bytes) -> bool:
    choices = json.loads(event.removeprefix(b"data: "))["choices"]
    return bool(choices and choices[0]["delta"].get("content"))


def health(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/health", timeout=30) as response:
        return json.loads(response.read())


@contextmanager
def serving(adapter: Path, device: str, log: Path, max_batch_size: int, queue_size: int) -> Iterator[str]:
    """``m2pt serve ADAPTER`` on a free loopback port; yields its URL once it listens, stops it after."""
    command = [sys.executable, "-m", "m2pt_cli", "serve", str(adapter), "--port", "0", "--device", device]
    command += ["--max-batch-size", str(max_batch_size), "--queue-size", str(queue_size)]
    with log.open("w") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, env=child_env())
    try:
        deadline = time.monotonic() + 900  # a 7B base is drawn or read before the port opens
        while True:
            found = re.search(r" at (http://\S+) ", log.read_text())
            if found:
                break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"m2pt serve did not start (log {log}):\n{log.read_text()[-2000:]}")
            time.sleep(0.2)
        yield found.group(1)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def requests_per_second(
    url: str, concurrency: tuple[int, ...], requests: int, bodies: list[dict[str, Any]], rounds: int = 3
) -> dict[str, Any]:
    """Median requests/s over ``rounds`` rounds of ``requests`` requests (``bodies`` in turn) per
    concurrency, and the rows the server answered per batch; one warm-up request first."""
    post(url, bodies[0])
    out: dict[str, Any] = {"serve_requests": requests, "serve_rounds": rounds}
    for clients in concurrency:
        rates, rows_per_batch = [], []
        for _ in range(rounds):
            before = health(url)
            started = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                list(pool.map(lambda k: post(url, bodies[k % len(bodies)]), range(requests)))
            rates.append(requests / (time.perf_counter() - started))
            after = health(url)
            batches = max(1, after["batches"] - before["batches"])
            rows_per_batch.append((after["answered"] - before["answered"]) / batches)
        out[f"serve_rps_c{clients}"] = statistics.median(rates)
        out[f"serve_rows_per_batch_c{clients}"] = statistics.median(rows_per_batch)
    return out


def time_to_first_token(url: str, bodies: list[dict[str, Any]], count: int) -> dict[str, Any]:
    """Median and 90th percentile milliseconds to the first streamed text of ``count`` requests sent
    one at a time (``bodies`` in turn)."""
    times = sorted(1000 * post(url, bodies[k % len(bodies)], first_token=True) for k in range(count))
    return {"ttft_ms_median": statistics.median(times), "ttft_ms_p90": percentile(times, 0.9), "ttft_requests": count}
