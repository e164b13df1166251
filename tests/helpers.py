"""Small helpers shared by tests."""

from __future__ import annotations

from m2pt_cli.chat import render, to_messages


def chat_inputs(backbone, processor, images, questions, answers=None, template="processor"):
    """Model inputs for image-question(-answer) pairs through the chat template."""
    texts = []
    for i, question in enumerate(questions):
        turns = [{"from": "human", "value": f"<image>\n{question}"}]
        if answers is not None:
            turns.append({"from": "gpt", "value": answers[i]})
        texts.append(render(processor, to_messages(turns), template, add_generation_prompt=answers is None))
    return backbone.build_inputs(processor, images, texts)
