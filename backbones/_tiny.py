"""Tiny LLaVA models built from config objects: the demo base and the test fixtures.

No download: the tokenizer is character-level and built here, the image processor is CLIP's with a
small size, and the weights come from a seeded initialisation.
"""

from __future__ import annotations

from pathlib import Path

import torch

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")

# LLaVA-1.5 conversation format ("USER: <image>\n... ASSISTANT: ...</s>"), as in llava-hf.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: {% for part in message['content'] %}{{ part['text'] }}{% endfor %}</s>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def char_tokenizer():
    """A character-level tokenizer (printable ASCII and newline) that adds ``<s>`` in front."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for char in [chr(i) for i in range(32, 127)] + ["\n"]:
        vocab.setdefault(char, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def tiny_llava_config(
    vision_layers: int = 4,
    vision_width: int = 32,
    text_layers: int = 4,
    text_width: int = 64,
    image_size: int = 32,
    patch_size: int = 8,
    heads: int = 4,
    kv_heads: int = 2,
    attn_implementation: str = "sdpa",
):
    """A LlavaConfig for a tiny CLIP + Llama (grouped-query attention by default)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    n_vocab = len(SPECIAL_TOKENS) + 96
    vision = CLIPVisionConfig(
        hidden_size=vision_width,
        intermediate_size=vision_width * 2,
        num_hidden_layers=vision_layers,
        num_attention_heads=heads,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=vision_width,
    )
    text = LlamaConfig(
        vocab_size=n_vocab,
        hidden_size=text_width,
        intermediate_size=text_width * 2,
        num_hidden_layers=text_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=SPECIAL_TOKENS.index("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    config._attn_implementation = attn_implementation
    config.text_config._attn_implementation = attn_implementation
    config.vision_config._attn_implementation = attn_implementation
    config.pad_token_id = 3
    return config


def tiny_llava_processor(config):
    """A LlavaProcessor matching ``config``: CLIP preprocessing at the config's image size."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    size = config.vision_config.image_size
    images = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return LlavaProcessor(
        image_processor=images,
        tokenizer=char_tokenizer(),
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        chat_template=CHAT_TEMPLATE,
    )


def save_tiny_llava(folder: str | Path, config=None, seed: int = 0) -> Path:
    """Build a tiny LLaVA with seeded weights and save model and processor to ``folder``."""
    from transformers import LlavaForConditionalGeneration

    config = config or tiny_llava_config()
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    folder = Path(folder)
    model.save_pretrained(folder)
    tiny_llava_processor(config).save_pretrained(folder)
    return folder


def demo_config():
    """The demo recipe's base: CLIP 4 x 64 at 32 px (patch 8) + Llama 4 x 128, fp32.

    Weights are drawn with std 0.15 instead of transformers' 0.02: at 0.02 a random 128-wide
    lm_head cannot give any token more than ~12 % probability (|w| |h| is about 2.6), so no prompt
    could teach the frozen model an answer. At 0.15 prompts and projector learn digits in a minute.
    """
    config = tiny_llava_config(vision_layers=4, vision_width=64, text_layers=4, text_width=128)
    for part in (config, config.text_config, config.vision_config):
        part.initializer_range = 0.15
    return config


if __name__ == "__main__":  # python -m backbones._tiny recipes/demo/model
    import sys

    print(save_tiny_llava(sys.argv[1], demo_config(), seed=0))
