"""Small helpers shared by tests."""

from __future__ import annotations

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
