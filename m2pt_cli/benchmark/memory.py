"""Peak memory of one method's training steps, measured in a fresh child process."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from m2pt_cli import trust
from m2pt_cli.benchmark.methods import Shapes, build_method, synthetic_batch, train_step
from m2pt_cli.benchmark.timing import sync


def release(device: str) -> None:
    """Collect what this process no longer holds and, on CUDA, hand its allocator's cache back: a
    probe is another process, and memory cached here is not free there."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def child_env() -> dict[str, str]:
    """A child's environment: this one, with PyTorch's CUDA allocator growing its segments in place
    unless the user chose a setting (fragmentation must not decide whether a method fits)."""
    env = dict(os.environ)
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    return env


def peak_memory_child(
    recipe: Path, method: str, overrides: tuple[str, ...], shapes: Shapes, steps: int, device: str
) -> int:
    """Peak memory of building one method and running ``steps`` training steps, in a fresh process
    (bytes; on CPU the peak resident set above what the imports take)."""
    payload = json.dumps(
        {
            "recipe": str(recipe),
            "method": method,
            "overrides": list(overrides),
            "batch_size": shapes.batch_size,
            "seq_len": shapes.seq_len,
            "steps": steps,
            "device": device,
            "trust_remote_code": trust.remote_code_granted(),  # the parent's command line, handed on
        }
    )
    code = "import sys, m2pt_cli.benchmark.memory as b; b.child_main(sys.argv[1])"
    result = subprocess.run([sys.executable, "-c", code, payload], capture_output=True, text=True, env=child_env())
    if result.returncode != 0:
        raise RuntimeError(f"memory probe for {method} failed:\n{result.stderr[-2000:]}")
    return int(result.stdout.strip().splitlines()[-1])


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child_main(payload: str) -> None:
    """Entry point of the memory probe: run the steps, print the peak in bytes.

    On CPU: the model's weights plus the peak resident set during the steps above the resident set
    just before them (activations, gradients, optimizer state), sampled every millisecond; import
    and loading overheads, the same for every method, are left out.
    """
    import threading

    args = json.loads(payload)
    device = args["device"]
    shapes = Shapes(args["batch_size"], args["seq_len"])
    with trust.remote_code(args["trust_remote_code"]):
        model, processor, optimizer = build_method(
            Path(args["recipe"]), args["method"], tuple(args["overrides"]), device
        )
    batch = synthetic_batch(model, processor, shapes, device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        for _ in range(args["steps"]):
            train_step(model, optimizer, batch)
        sync(device)
        print(torch.cuda.max_memory_allocated())
        return
    weights = sum(t.nbytes for t in model.state_dict().values())
    before, peak, running = _rss(), [0], [True]

    def sample() -> None:
        while running[0]:
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for _ in range(args["steps"]):
        train_step(model, optimizer, batch)
    running[0] = False
    sampler.join()
    print(weights + max(peak[0] - before, 0))
