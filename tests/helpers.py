"""Small helpers shared by tests."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import logging
import os
import socket
import subprocess
import sys
import traceback
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file

from m2pt_cli.chat import instruction, render, to_messages

REPO = Path(__file__).resolve().parents[1]


def chat_inputs(backbone, processor, images, questions, answers=None, template="processor") -> dict:
    """Model inputs for image-question(-answer) pairs through the chat template."""
    texts, requests = [], []
    for i, question in enumerate(questions):
        turns = [{"from": "human", "value": f"<image>\n{question}"}]
        if answers is not None:
            turns.append({"from": "gpt", "value": answers[i]})
        messages = to_messages(turns, image_parts=backbone.image_in_text)
        texts.append(render(processor, messages, template, add_generation_prompt=answers is None))
        requests.append(instruction(turns))
    return dict(backbone.build_inputs(processor, images, texts, requests))


# Environment variables m2pt reads at call time: a call that sets only these can run in this process.
IN_PROCESS_ENV = {"M2PT_CACHE", "OMP_NUM_THREADS"}


def m2pt(*args, cwd=None, env=None, check=True, process=False, **kwargs):
    """Run the CLI and return a ``CompletedProcess``; fail with its stderr unless ``check`` is off.

    In this process through click's ``CliRunner`` (no new interpreter importing torch again) unless
    ``process`` asks for a real one, or the call needs one: subprocess keyword arguments other than
    ``input`` (timeouts, resource limits) or environment variables read at import time."""
    changed = {key for key, value in (env or {}).items() if os.environ.get(key) != value}
    in_process = not process and not (kwargs.keys() - {"input"}) and not (changed - IN_PROCESS_ENV)
    argv = [str(a) for a in args]
    if in_process:
        result = _m2pt_in_process(argv, Path(cwd or REPO), env or {}, kwargs.get("input"))
        gc.collect()  # the command's frames and what they hold (open files, mapped tensors) go now, as at exit
    else:
        env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        command = [sys.executable, "-m", "m2pt_cli", *argv]
        result = subprocess.run(command, capture_output=True, text=True, cwd=cwd or REPO, env=env, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"m2pt {' '.join(argv)} failed:\n{result.stderr[-3000:]}")
    return result


@contextlib.contextmanager
def _fresh_logging():
    """The ``m2pt`` logger and the root logger as a new interpreter has them (no handlers: warnings
    reach stderr through logging's last resort, not pytest's log capture); what the command attached
    (a run's log file) is closed afterwards, and the test process's own handlers come back."""
    root, ours = logging.getLogger(), logging.getLogger("m2pt")
    saved = root.handlers[:], ours.handlers[:], ours.level, ours.propagate, root.level
    root.handlers, ours.handlers = [], []
    root.setLevel(logging.WARNING)
    ours.setLevel(logging.NOTSET)
    ours.propagate = True
    try:
        yield
    finally:
        for handler in root.handlers + ours.handlers:
            handler.close()
        root.handlers, ours.handlers = saved[0], saved[1]
        ours.setLevel(saved[2])
        ours.propagate = saved[3]
        root.setLevel(saved[4])


def _m2pt_in_process(argv: list[str], cwd: Path, env: dict, stdin: str | None) -> subprocess.CompletedProcess:
    """``m2pt ARGV`` as ``python -m m2pt_cli`` would run it, in this process: in ``cwd``, with
    Python's default warning filters (shown on stderr, as a new interpreter shows them) and an
    unexpected exception turned into a traceback on stderr and exit code 1."""
    from click.testing import CliRunner

    from m2pt_cli.cli import cli

    before = os.getcwd()
    os.chdir(cwd)
    try:
        with warnings.catch_warnings(), _fresh_logging():
            warnings.resetwarnings()
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", category)
            result = CliRunner().invoke(cli, argv, input=stdin, env=env, prog_name="m2pt")
    finally:
        os.chdir(before)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(result.exception))
    return subprocess.CompletedProcess(["m2pt", *argv], result.exit_code, result.stdout, stderr)


def adapter(run: Path) -> dict[str, torch.Tensor]:
    """The final adapter tensors of a run folder."""
    return load_file(str(run / "adapter" / "adapter.safetensors"))


@torch.no_grad()
def greedy_without_cache(
    model, inputs: dict, max_new_tokens: int, eos_token_id: int | None, never: tuple[int, ...] = ()
) -> list[int]:
    """Greedy decoding of one sample as repeated full forwards, with no KV cache anywhere: the
    independent reference for ``generate``. Returns the new token ids (the EOS token included).
    Tokens in ``never`` are never chosen (as ``generate(min_new_tokens=...)`` does with EOS)."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    assert ids.shape[0] == 1
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(**{**inputs, "input_ids": ids, "attention_mask": mask}, use_cache=False).logits
        last = logits[0, -1].clone()
        last[list(never)] = float("-inf")
        token = int(last.argmax())
        new.append(token)
        if token == eos_token_id:
            break
        ids = torch.cat([ids, ids.new_tensor([[token]])], dim=1)
        mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
    return new


def snapshot(folder: Path) -> dict[str, str]:
    """Every path under ``folder`` with its content hash (``dir`` for folders)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in folder.rglob("*")
    }


def refused(args, folder: Path, *needles: str, cwd=None) -> None:
    """Run the CLI and assert a one-line error (exit 2) containing ``needles``, ``folder`` untouched."""
    before = snapshot(folder)
    result = m2pt(*args, check=False, cwd=cwd)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert snapshot(folder) == before


def free_port() -> int:
    """A loopback port free now: for a torchrun launch that must not meet another test's."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
