"""torch.compile in the bench: the graph breaks of a forward, and where they are (inside a layer or not)."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

COMPILED = "+compiled"  # suffix of a compiled arm's method name in the bench's rows


def layer_code(model) -> list[tuple[str, int, int]]:
    """(file, first line, last line) of every encoder and decoder block's ``forward`` and of every hook
    on a block (the prompt hooks among them): a frame there runs inside a layer."""
    blocks = [b for tower in _towers(model) for b in tower.blocks]
    functions = {type(b).forward for b in blocks}
    for block in blocks:
        for hooks in (block._forward_pre_hooks, block._forward_hooks):
            functions.update(hooks.values())
    spans = []
    for function in functions:
        function = inspect.unwrap(getattr(function, "func", function))
        try:
            lines, first = inspect.getsourcelines(function)
            spans.append((str(Path(inspect.getsourcefile(function)).resolve()), first, first + len(lines) - 1))
        except (OSError, TypeError):  # no Python source (a builtin): no frame of it in a stack either
            continue
    return spans


@contextmanager
def _checkpointing_off(model) -> Iterator[None]:
    """Activation checkpointing off while inside, back on after: dynamo traces a checkpointed layer as
    one region and does not report a break inside it, so the layers are counted as they run without."""
    blocks = [b for tower in _towers(model) for b in tower.blocks]
    checkpointed = any(getattr(b, "gradient_checkpointing", False) for b in blocks)
    if checkpointed:
        model.activation_checkpointing_disable()
    try:
        yield
    finally:
        if checkpointed:
            model.activation_checkpointing_enable()


def _towers(model) -> tuple:
    backbone, base = model.backbone, model.base
    return backbone.vision_tower(base), backbone.language_tower(base)


def graph_breaks(model, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Trace one forward (loss included, activation checkpointing off) with ``torch._dynamo.explain``:
    the graphs it captured, the graph breaks (graphs cut short by a reason; a frame traced on its own
    after its caller broke starts a graph without one), and how many breaks lie inside an encoder or
    decoder layer (a frame of the layer's ``forward`` or of a hook on the layer, the prompt hooks among
    them, in the break's stack)."""
    spans = layer_code(model)

    def inside(frame) -> bool:
        name = str(Path(frame.filename).resolve())
        return any(name == file and first <= frame.lineno <= last for file, first, last in spans)

    torch._dynamo.reset()
    try:
        with _checkpointing_off(model):
            explained = torch._dynamo.explain(model)(**batch)
    finally:
        torch._dynamo.reset()  # what explain traced must not serve a later torch.compile
    reasons = []
    for record in explained.break_reasons:
        stack = list(record.user_stack)
        where = f"{Path(stack[-1].filename).name}:{stack[-1].lineno} {stack[-1].name}" if stack else "?"
        reasons.append(
            {"reason": record.reason.splitlines()[0][:200], "where": where, "in_layer": any(map(inside, stack))}
        )
    return {
        "graphs": explained.graph_count,
        "graph_breaks": len(reasons),
        "graph_breaks_in_layers": sum(r["in_layer"] for r in reasons),
        "graph_break_reasons": reasons,
    }
