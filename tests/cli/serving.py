"""A real ``m2pt serve`` process for tests: started on a free loopback port, stopped afterwards."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.helpers import REPO


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def user_message(image: Path, question: str) -> dict:
    return {
        "role": "user",
        "content": [{"type": "image_url", "image_url": {"url": data_uri(image)}}, {"type": "text", "text": question}],
    }


class Server:
    """``m2pt serve ADAPTER --port 0 ...`` as a subprocess; ``url`` once it answers /health."""

    def __init__(self, adapter: Path, *args: str, log: Path) -> None:
        self.log = log
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        command = [sys.executable, "-m", "m2pt_cli", "serve", str(adapter), "--port", "0", "--device", "cpu", *args]
        self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"))
        self.url = self._wait()

    def _wait(self, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(r"at (http://\S+) ", self.log.read_text())
            if found:
                return found.group(1)
            if self.process.poll() is not None:
                raise AssertionError(f"m2pt serve exited {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.2)
        raise AssertionError(f"m2pt serve did not start:\n{self.log.read_text()[-3000:]}")

    def health(self) -> dict:
        with urllib.request.urlopen(f"{self.url}/health", timeout=10) as response:
            return json.loads(response.read())

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
