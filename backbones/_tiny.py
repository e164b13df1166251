"""Tiny LLaVA models built from config objects: the demo base and the test fixtures.

No download: the tokenizer is character-level and built here, the image processor is CLIP's with a
small size, and the weights come from a seeded initialisation.
"""

from __future__ import annotations

from pathlib import Path

import torch

from m2pt_cli.backbones.templates import LLAVA_TURNS, VICUNA_V1

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")

CHAT_TEMPLATE = LLAVA_TURNS  # LLaVA-1.5's conversation format, as in llava-hf


def char_tokenizer(image_token: bool = True):
    """A character-level tokenizer (printable ASCII and newline) that adds ``<s>`` in front.

    Without ``image_token`` it has no ``<image>`` token, like Vicuna's.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = SPECIAL_TOKENS if image_token else SPECIAL_TOKENS[:-1]
    vocab = {token: i for i, token in enumerate(specials)}
    for char in [chr(i) for i in range(32, 127)] + ["\n"]:
        vocab.setdefault(char, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


N_VOCAB = len(SPECIAL_TOKENS) + 96


def tiny_llama_config(layers: int = 4, width: int = 64, heads: int = 4, kv_heads: int = 2):
    """A LlamaConfig for the character tokenizer (grouped-query attention by default)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=N_VOCAB,
        hidden_size=width,
        intermediate_size=width * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
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
    from transformers import CLIPVisionConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=vision_width,
        intermediate_size=vision_width * 2,
        num_hidden_layers=vision_layers,
        num_attention_heads=heads,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=vision_width,
    )
    text = tiny_llama_config(text_layers, text_width, heads, kv_heads)
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=SPECIAL_TOKENS.index("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        attn_implementation=attn_implementation,  # the sub-configs take it too
    )
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


def tiny_opt_config(layers: int = 4, width: int = 64, heads: int = 4):
    """An OPTConfig for the character tokenizer (InstructBLIP's other decoder family)."""
    from transformers import OPTConfig

    return OPTConfig(
        vocab_size=N_VOCAB,
        hidden_size=width,
        ffn_dim=width * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        word_embed_proj_dim=width,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        enable_bias=True,
        dropout=0.0,
        attention_dropout=0.0,
    )


def tiny_instructblip_config(llm: str = "llama", query_tokens: int = 4):
    """An InstructBlipConfig: ViT 3 x 32 at 32 px (patch 8), Q-Former 2 x 32, Llama or OPT 4 x 64."""
    from transformers import InstructBlipConfig, InstructBlipQFormerConfig, InstructBlipVisionConfig

    # transformers' InstructBlipVisionConfig defaults to initializer_range=1e-10, which leaves a freshly
    # initialised ViT dead (noise pixels moved the logits by 2e-7, visual prompts by exactly 0). At 0.02 the
    # ViT and the Q-Former's near-uniform cross-attention still hide the image (visual prompts move the logits
    # by 2e-4); at 0.2 for both, by about 0.2 (tests/m2pt_cli/test_liveness.py guards this).
    vision = InstructBlipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        initializer_range=0.2,
    )
    qformer = InstructBlipQFormerConfig(
        vocab_size=N_VOCAB,
        initializer_range=0.2,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        cross_attention_frequency=1,
        pad_token_id=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    text = tiny_llama_config() if llm == "llama" else tiny_opt_config()
    config = InstructBlipConfig(
        vision_config=vision,
        qformer_config=qformer,
        text_config=text,
        num_query_tokens=query_tokens,
        image_token_index=SPECIAL_TOKENS.index("<image>"),
    )
    config.pad_token_id = 3
    return config


def save_tiny_instructblip(folder: str | Path, config=None, seed: int = 0) -> Path:
    """Build a tiny InstructBLIP with seeded weights and save model and processor to ``folder``."""
    from transformers import BlipImageProcessor, InstructBlipForConditionalGeneration, InstructBlipProcessor

    config = config or tiny_instructblip_config()
    torch.manual_seed(seed)
    model = InstructBlipForConditionalGeneration(config)
    with torch.no_grad():  # transformers starts the query tokens at zero: all alike, so every query reads the same
        model.query_tokens.normal_(0.0, config.qformer_config.initializer_range)
    folder = Path(folder)
    model.save_pretrained(folder)
    size = config.vision_config.image_size
    processor = InstructBlipProcessor(
        image_processor=BlipImageProcessor(size={"height": size, "width": size}),
        tokenizer=char_tokenizer(),
        qformer_tokenizer=char_tokenizer(),
        num_query_tokens=config.num_query_tokens,
    )
    processor.save_pretrained(folder)
    return folder


# A tiny open_clip CLIP: ViT 3 x 32 at 32 px (patch 8, 16 patches); its text tower is never used.
TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 32, "head_width": 8, "patch_size": 8, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}


def save_tiny_open_clip(folder: str | Path, seed: int = 0) -> Path:
    """A tiny open_clip model folder (open_clip_config.json + open_clip_model.safetensors), which
    open_clip loads as ``local-dir:FOLDER``."""
    import json

    from open_clip.model import CLIP
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = CLIP(**TINY_OPEN_CLIP)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    preprocess = {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}
    config = {"model_cfg": TINY_OPEN_CLIP, "preprocess_cfg": preprocess}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder


def save_tiny_vicuna(folder: str | Path, seed: int = 0, tie_embeddings: bool = False) -> Path:
    """A tiny Llama causal LM whose tokenizer, like Vicuna's, has no ``<image>`` token and exactly as
    many tokens as the embedding has rows (so the image token m2pt adds lies outside the vocabulary).
    ``tie_embeddings``: the output layer is the input embedding (as in SmolLM2)."""
    from transformers import LlamaForCausalLM

    tokenizer = char_tokenizer(image_token=False)
    tokenizer.chat_template = VICUNA_V1  # the LLM's own template (chat_template: processor)
    config = tiny_llama_config()
    config.vocab_size = len(tokenizer)
    config.tie_word_embeddings = tie_embeddings
    torch.manual_seed(seed)
    folder = Path(folder)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_llava_projector(path: str | Path, projector: torch.nn.Module) -> Path:
    """Write ``projector`` the way LLaVA's pretraining stage saves it: ``mm_projector.bin`` with keys
    ``model.mm_projector.*`` (a torch pickle of tensors only)."""
    state = {f"model.mm_projector.{k}": v.detach().clone() for k, v in projector.state_dict().items()}
    torch.save(state, path)
    return Path(path)


if __name__ == "__main__":  # python -m m2pt_cli.backbones._tiny recipes/demo/model
    import sys

    print(save_tiny_llava(sys.argv[1], demo_config(), seed=0))
