"""Small helpers shared by tests."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
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


def m2pt(*args, cwd=None, env=None, check=True, **kwargs):
    """Run the real CLI in a subprocess; fail with its stderr unless ``check`` is off."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    result = subprocess.run(
        [sys.executable, "-m", "m2pt_cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd or REPO,
        env=env,
        **kwargs,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"m2pt {' '.join(map(str, args))} failed:\n{result.stderr[-3000:]}")
    return result


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
