"""A soak of ``m2pt serve`` on loopback: clients send well-formed requests (each answer checked
against the server's own unbatched greedy answer) mixed with hostile ones (text of a megabyte,
prompts over the token limit, lone surrogates, JSON nested 100,000 deep, booleans for numbers,
an 8192 x 8192 PNG, images that are not images, streams cut off after the first event, request
heads that never end). tests/cli/test_serve_hostile.py runs it for 30 s; as a script it starts its
own server and writes the figures as JSON:

    python -m tests.cli.soak ADAPTER --seconds 120 --clients 16 --out soak.json
"""

from __future__ import annotations

import argparse
import base64
import functools
import http.client
import io
import json
import os
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

HEAD_TIMEOUT_S = 10.0  # m2pt_cli.serving.server.HEADER_TIMEOUT_S


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


@functools.cache
def flat_png(side: int) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (side, side), (120, 120, 120)).save(out, "PNG")
    return out.getvalue()


def request(image_url: str, text: str, **fields) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": text}]
    return {"messages": [{"role": "user", "content": parts}], **fields}


@dataclass
class Result:
    kind: str
    status: int
    seconds: float
    problem: str = ""  # a well-formed request answered wrongly, or a 5xx


@dataclass
class Report:
    results: list[Result] = field(default_factory=list)
    rss_before: int = 0
    rss_after: int = 0
    fds_before: int = 0
    fds_after: int = 0
    seconds: float = 0.0

    @property
    def problems(self) -> list[str]:
        return [f"{r.kind}: {r.status} {r.problem}" for r in self.results if r.problem]

    def latency(self, quantile: float) -> float:
        times = sorted(r.seconds for r in self.results if r.kind.startswith("well-formed"))
        return times[min(len(times) - 1, int(quantile * len(times)))] if times else float("nan")

    def summary(self) -> dict:
        return {
            "seconds": round(self.seconds, 1),
            "requests": dict(Counter(r.kind for r in self.results)),
            "statuses": dict(Counter(str(r.status) for r in self.results)),
            "well_formed_p50_ms": round(1000 * self.latency(0.5), 1),
            "well_formed_p99_ms": round(1000 * self.latency(0.99), 1),
            "rss_mb_before_after": [self.rss_before >> 20, self.rss_after >> 20],
            "fds_before_after": [self.fds_before, self.fds_after],
            "problems": self.problems[:20],
        }


class Soak:
    """Clients against the server at ``url`` (process ``pid``), asking about ``cases``:
    (PNG bytes, question) pairs whose greedy answers ``expected`` holds."""

    def __init__(self, url: str, pid: int, cases: list[tuple[bytes, str]], expected: list[str] | None = None) -> None:
        parts = urlsplit(url)
        self.host, self.port, self.pid = parts.hostname, parts.port, pid
        self.cases = [(data_uri(png), question) for png, question in cases]
        self.expected = expected if expected is not None else [self.answer(k) for k in range(len(cases))]
        self.big = data_uri(flat_png(8192))
        self.held: list[socket.socket] = []  # request heads that never end
        self.lock = threading.Lock()

    # -- HTTP -----------------------------------------------------------------------------
    def post(self, body: bytes | dict, timeout: float = 120) -> tuple[int, bytes]:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        connection = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            connection.request("POST", "/v1/chat/completions", raw, {"Content-Type": "application/json"})
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def answer(self, k: int, stream: bool = False) -> str:
        image, question = self.cases[k]
        status, data = self.post(request(image, question, stream=stream))
        if status != 200:
            return f"<{status} {data[:200]!r}>"
        if not stream:
            return json.loads(data)["choices"][0]["message"]["content"]
        events = [e.removeprefix("data: ") for e in data.decode().split("\n\n") if e]
        if events[-1] != "[DONE]":
            return f"<stream without [DONE]: {events[-1][:200]}>"
        return "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1])

    # -- what clients send ----------------------------------------------------------------
    def well_formed(self, rng: random.Random) -> Result:
        k, stream = rng.randrange(len(self.cases)), rng.random() < 0.5
        started = time.monotonic()
        got = self.answer(k, stream)
        seconds = time.monotonic() - started
        wrong = "" if got == self.expected[k] else f"case {k}: {got!r} != {self.expected[k]!r}"
        return Result("well-formed stream" if stream else "well-formed", 200 if not wrong else 0, seconds, wrong)

    def hostile(self, kind: str, rng: random.Random) -> Result:
        image, question = self.cases[rng.randrange(len(self.cases))]
        bodies: dict[str, Callable[[], bytes | dict]] = {
            "1 MB of text": lambda: request(image, "7" * 1_000_000),
            "over the token limit": lambda: request(image, "Which digit? " * 40),
            "lone surrogate": lambda: json.dumps(request(image, "a")).replace('"a"', '"\\ud800"').encode(),
            "JSON 100,000 deep": lambda: b"[" * 100_000 + b"]" * 100_000,
            "temperature false": lambda: request(image, question, temperature=False),
            "not an image": lambda: request("data:image/png;base64,aGVsbG8gd29ybGQ=", question),
            "8192 x 8192 PNG": lambda: request(self.big, question),
        }
        started = time.monotonic()
        if kind == "stream cut off":
            status = self.cut_off(request(image, question, stream=True, max_tokens=64))
        elif kind == "head never ends":
            status = self.hold_head()
        else:
            status, _ = self.post(bodies[kind]())
        seconds = time.monotonic() - started
        wanted = {"8192 x 8192 PNG": 200, "stream cut off": 200, "head never ends": 0}.get(kind, 400)
        problem = "" if status == wanted else f"wanted {wanted}"
        return Result(kind, status, seconds, problem)

    def cut_off(self, body: dict) -> int:
        """Start a stream, read its first event, hang up."""
        connection = http.client.HTTPConnection(self.host, self.port, timeout=60)
        try:
            connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
            response = connection.getresponse()
            response.fp.readline()
            return response.status
        finally:
            connection.close()

    def hold_head(self) -> int:
        held = socket.create_connection((self.host, self.port), timeout=10)
        held.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-")
        with self.lock:
            self.held.append(held)
        return 0

    HOSTILE = (
        ("1 MB of text", 0.06),
        ("over the token limit", 0.06),
        ("lone surrogate", 0.06),
        ("JSON 100,000 deep", 0.04),
        ("temperature false", 0.04),
        ("not an image", 0.04),
        ("8192 x 8192 PNG", 0.01),
        ("stream cut off", 0.06),
        ("head never ends", 0.01),
    )

    def client(self, seed: int, deadline: float, out: list[Result]) -> None:
        rng = random.Random(seed)
        while time.monotonic() < deadline:
            roll, kind = rng.random(), None
            for name, share in self.HOSTILE:
                if roll < share:
                    kind = name
                    break
                roll -= share
            try:
                result = self.hostile(kind, rng) if kind else self.well_formed(rng)
            except OSError as exc:  # a refused or reset connection is a failure too
                result = Result(kind or "well-formed", -1, 0.0, f"{type(exc).__name__}: {exc}")
            if result.status >= 500:
                result.problem = result.problem or "a 5xx"
            out.append(result)

    # -- the server process ----------------------------------------------------------------
    def rss(self) -> int:
        import psutil

        return psutil.Process(self.pid).memory_info().rss

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def health(self) -> dict:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=10)
        try:
            connection.request("GET", "/health")
            return json.loads(connection.getresponse().read())
        finally:
            connection.close()

    def settle(self, timeout: float = 60) -> None:
        """Wait until no request is open and every connection is closed on the server's side."""
        deadline = time.monotonic() + timeout
        while self.health()["open_requests"] and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)

    def run(self, seconds: float, clients: int = 16) -> Report:
        report = Report()
        for kind, _ in self.HOSTILE:  # once each first, so that lazily built state is in the baseline
            if kind != "head never ends":
                self.hostile(kind, random.Random(0))
        self.settle()
        report.rss_before, report.fds_before = self.rss(), self.fds()
        outs: list[list[Result]] = [[] for _ in range(clients)]
        started = time.monotonic()
        threads = [
            threading.Thread(target=self.client, args=(seed, started + seconds, outs[seed])) for seed in range(clients)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        report.seconds = time.monotonic() - started
        report.results = [r for out in outs for r in out]
        self.settle()
        if self.held:  # the server drops them HEAD_TIMEOUT_S after they opened
            time.sleep(HEAD_TIMEOUT_S + 1)
        report.rss_after, report.fds_after = self.rss(), self.fds()
        for held in self.held:
            held.close()
        return report


def digit_cases(count: int = 16) -> list[tuple[bytes, str]]:
    from itertools import islice

    from m2pt_cli.benches import BENCHES

    samples = islice(BENCHES.get("demo").samples(None, None, False), count)
    return [(sample.image["bytes"], sample.question) for sample in samples]


def main() -> None:
    from tests.cli.serving import Server

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("adapter", type=Path)
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    log = Path(os.environ.get("TMPDIR", "/tmp")) / "m2pt-soak-serve.log"
    with Server(args.adapter, "--max-image-mb", "1", log=log) as server:
        report = Soak(server.url, server.process.pid, digit_cases()).run(args.seconds, args.clients)
    summary = json.dumps(report.summary(), indent=2)
    print(summary)
    if args.out:
        args.out.write_text(summary + "\n")


if __name__ == "__main__":
    main()
