"""The CLI in a real process whose peak resident memory and wall time are measured (for tests that
bound what a hostile file can cost)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.helpers import REPO

# The peak is this process's own high-water mark (VmHWM). Not ru_maxrss: Linux carries the launching
# process's peak across the fork and exec into it, so a test worker that has grown large would be
# reported as the command's peak.
PROGRAM = """
import os, sys
from m2pt_cli.cli import main
sys.argv = ["m2pt", *sys.argv[1:]]
try:
    main()
finally:
    with open("/proc/self/status") as status:
        peak = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    with open(os.environ["M2PT_TEST_PEAK"], "w") as handle:
        handle.write(str(peak))
"""


@dataclass
class Measured:
    returncode: int
    stdout: str
    stderr: str
    peak_bytes: int
    seconds: float


def run_measured(*args, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: int = 300) -> Measured:
    """``m2pt ARGS`` in a new interpreter; its peak RSS (bytes) and wall time (seconds, imports included)."""
    peak = Path(tempfile.mkdtemp(prefix="m2pt-peak-")) / "peak"
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {}), "M2PT_TEST_PEAK": str(peak)}
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", PROGRAM, *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd or REPO,
        env=full_env,
        timeout=timeout,
    )
    seconds = time.monotonic() - started
    try:
        peak_bytes = int(peak.read_text())
    finally:
        shutil.rmtree(peak.parent)
    return Measured(result.returncode, result.stdout, result.stderr, peak_bytes, seconds)
