"""Small GGUF files built with the ``gguf`` package's ``GGUFWriter``: a tiny Llama that converts
and loads, and the pieces to build hostile ones from it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

WIDTH, FF, HEADS, KV_HEADS, LAYERS = 16, 32, 2, 1, 2
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def vocabulary() -> list[str]:
    """GPT-2 byte-level tokens for every byte, then the chat's special tokens."""
    from tokenizers.pre_tokenizers import ByteLevel

    return [*sorted(ByteLevel.alphabet()), "Ġt", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def llama_tensors(width: int = WIDTH, layers: int = LAYERS, vocab: int | None = None) -> dict[str, np.ndarray]:
    """A Llama's tensors under their GGUF names, as float32 numpy arrays (numpy shape = GGUF dims reversed)."""
    rng = np.random.default_rng(0)
    vocab = vocab or len(vocabulary())
    head = width // HEADS
    shapes = {"token_embd.weight": (vocab, width), "output_norm.weight": (width,)}
    for i in range(layers):
        shapes |= {
            f"blk.{i}.attn_norm.weight": (width,),
            f"blk.{i}.attn_q.weight": (width, width),
            f"blk.{i}.attn_k.weight": (KV_HEADS * head, width),
            f"blk.{i}.attn_v.weight": (KV_HEADS * head, width),
            f"blk.{i}.attn_output.weight": (width, width),
            f"blk.{i}.ffn_norm.weight": (width,),
            f"blk.{i}.ffn_gate.weight": (FF, width),
            f"blk.{i}.ffn_up.weight": (FF, width),
            f"blk.{i}.ffn_down.weight": (width, FF),
        }
    return {name: rng.standard_normal(shape).astype(np.float32) * 0.1 for name, shape in shapes.items()}


def write_gguf(
    path: Path,
    tensors: dict[str, np.ndarray] | None = None,
    width: int = WIDTH,
    layers: int = LAYERS,
    chat_template: str | None = CHAT_TEMPLATE,
    extra: dict[str, Any] | None = None,
    skip: tuple[str, ...] = (),
) -> Path:
    """A tiny Llama GGUF at ``path``: metadata for ``width`` x ``layers`` and ``tensors`` (default: all
    of them, of the right shapes). ``extra`` adds or replaces keys (value, or (value, GGUFValueType));
    ``skip`` leaves keys out."""
    from gguf import GGUFValueType, GGUFWriter

    tokens = vocabulary()
    writer = GGUFWriter(str(path), "llama")
    keys: dict[str, Any] = {
        "llama.block_count": (layers, GGUFValueType.UINT32),
        "llama.context_length": (256, GGUFValueType.UINT32),
        "llama.embedding_length": (width, GGUFValueType.UINT32),
        "llama.feed_forward_length": (FF, GGUFValueType.UINT32),
        "llama.attention.head_count": (HEADS, GGUFValueType.UINT32),
        "llama.attention.head_count_kv": (KV_HEADS, GGUFValueType.UINT32),
        "llama.attention.layer_norm_rms_epsilon": (1e-5, GGUFValueType.FLOAT32),
        "llama.rope.freq_base": (10000.0, GGUFValueType.FLOAT32),
        "tokenizer.ggml.model": ("gpt2", GGUFValueType.STRING),
        "tokenizer.ggml.tokens": (tokens, GGUFValueType.ARRAY),
        "tokenizer.ggml.token_type": ([1] * (len(tokens) - 3) + [3, 3, 3], GGUFValueType.ARRAY),
        "tokenizer.ggml.merges": (["Ġ t"], GGUFValueType.ARRAY),
        "tokenizer.ggml.bos_token_id": (len(tokens) - 3, GGUFValueType.UINT32),
        "tokenizer.ggml.eos_token_id": (len(tokens) - 1, GGUFValueType.UINT32),
        "tokenizer.ggml.padding_token_id": (len(tokens) - 3, GGUFValueType.UINT32),
    }
    if chat_template is not None:
        keys["tokenizer.chat_template"] = (chat_template, GGUFValueType.STRING)
    for key, value in (extra or {}).items():
        keys[key] = value if isinstance(value, tuple) else (value, None)
    for key, (value, kind) in keys.items():
        if key in skip:
            continue
        if kind is None:
            kind = GGUFValueType.get_type(value)
        if kind == GGUFValueType.ARRAY:
            writer.add_array(key, value)
        else:
            writer.add_key_value(key, value, kind)
    for name, array in (llama_tensors(width, layers) if tensors is None else tensors).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)
