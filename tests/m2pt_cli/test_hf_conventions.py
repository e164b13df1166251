"""The prompt mechanism against transformers' calling conventions: right answers or a loud error.

A decode step is compared with an independent reference, the full forward over the whole sequence
without any cache. Under either spelling of the cache keyword, on the oldest and the newest
supported transformers, a prompted stack gives that reference; where the mechanism cannot see the
cache it raises ``ConventionError``; it never answers wrongly.
"""

from __future__ import annotations

import os

import pytest
import torch

import m2pt_cli
from m2pt_cli import hf_conventions as hf
from m2pt_cli.hf_conventions import ConventionError

# transformers warns about the deprecated spelling, which these tests use on purpose
pytestmark = pytest.mark.filterwarnings("ignore:.*(past_key_values|cache).*:FutureWarning")


def load(recipe, *overrides):
    model, processor = m2pt_cli.load(recipe, overrides=overrides)
    return model.eval(), processor


def stack_inputs(case, model, lengths=(6, 9)):
    """The prompted decoder stack and a left-padded batch of token embeddings for it."""
    tower = case.backbone.language_tower(model.base)
    vocab = tower.embed.num_embeddings
    ids = torch.randint(0, vocab, (len(lengths), max(lengths)), generator=torch.Generator().manual_seed(0))
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, -n:] = 1
    return tower.stack, tower.embed, ids, mask


def prefill_then_step(case, model, keyword: str):
    """The last hidden state of one cached decode step, passing the cache as ``keyword``, and the
    reference: the same position from a full forward over the whole sequence without any cache."""
    stack, embed, ids, mask = stack_inputs(case, model)
    nxt = torch.randint(0, embed.num_embeddings, (ids.shape[0], 1), generator=torch.Generator().manual_seed(1))
    longer = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    with torch.no_grad():
        cache = hf.output_cache(stack(inputs_embeds=embed(ids), attention_mask=mask, use_cache=True))
        assert cache is not None and hf.cached_length(cache) > 0
        step = stack(inputs_embeds=embed(nxt), attention_mask=longer, use_cache=True, **{keyword: cache})
        full = stack(inputs_embeds=embed(torch.cat([ids, nxt], dim=1)), attention_mask=longer, use_cache=False)
    return step.last_hidden_state[:, -1], full.last_hidden_state[:, -1]


@pytest.mark.parametrize("keyword", hf.CACHE_KEYWORDS)
@pytest.mark.parametrize("layers", ["all", "0-1"])
def test_a_decode_step_matches_the_full_forward_under_either_cache_keyword(case, keyword, layers):
    model, _ = load(case.recipe, f"prompts.text.layers={layers}")
    step, reference = prefill_then_step(case, model, keyword)
    assert (step - reference).abs().max().item() <= 1e-4


def test_an_unseen_cache_is_an_error_not_a_wrong_answer(case, monkeypatch):
    """transformers 5.24's rename, replayed: the hook stops finding the cache; generation must stop."""
    model, processor = load(case.recipe)
    x = case.inputs(processor, 2, side="left")
    monkeypatch.setattr(hf, "route_cache", lambda stack, kwargs: None)
    with pytest.raises(ConventionError, match=r"attention mask over \d+ tokens"):
        model.generate(**x, max_new_tokens=3, min_new_tokens=3, do_sample=False)


def test_an_unseen_cache_without_a_mask_is_caught_after_the_step(case, monkeypatch):
    model, _ = load(case.recipe)
    stack, embed, ids, _ = stack_inputs(case, model, lengths=(5,))
    embeds = embed(ids)
    with torch.no_grad():
        cache = hf.output_cache(stack(inputs_embeds=embeds, use_cache=True))
        monkeypatch.setattr(hf, "route_cache", lambda stack, kwargs: None)
        keyword = hf._declared_cache_keyword(type(stack))
        with pytest.raises(ConventionError, match="did not see the cache"):
            stack(inputs_embeds=embeds[:, :1], use_cache=True, **{keyword: cache})


def test_a_cache_for_a_stack_without_a_cache_keyword_is_refused():
    class NoCacheStack(torch.nn.Module):
        def forward(self, inputs_embeds=None, attention_mask=None):
            return inputs_embeds

    with pytest.raises(ConventionError, match="NoCacheStack.forward takes none of the cache keywords"):
        hf.route_cache(NoCacheStack(), {"cache": FakeCache(3)})


class FakeCache:
    def __init__(self, length: int):
        self.length = length

    def get_seq_length(self) -> int:
        return self.length


def test_find_cache_reads_both_spellings_and_refuses_strays():
    cache = FakeCache(4)
    assert hf.find_cache({"cache": cache}) is cache
    assert hf.find_cache({"past_key_values": cache}) is cache
    assert hf.find_cache({"cache": cache, "past_key_values": cache}) is cache
    assert hf.find_cache({"past_key_values": None, "attention_mask": torch.ones(1, 2)}) is None
    with pytest.raises(ConventionError, match="two different KV caches"):
        hf.find_cache({"cache": cache, "past_key_values": FakeCache(4)})
    with pytest.raises(ConventionError, match="unknown keyword 'kv_cache'"):
        hf.find_cache({"kv_cache": cache})


def test_check_step_accepts_consistent_steps_and_names_the_inconsistent_one():
    hf.check_step(past=0, step=7, mask_length=7, n_prompts=3)  # prefill
    hf.check_step(past=10, step=1, mask_length=8, n_prompts=3)  # 3 prompts + 7 real cached, 1 new
    hf.check_step(past=10, step=1, mask_length=None, n_prompts=3)
    with pytest.raises(ConventionError, match="over 8 tokens, expected 1") as exc:
        hf.check_step(past=0, step=1, mask_length=8, n_prompts=3)  # a decode step that saw no cache
    assert hf.transformers_version() in str(exc.value)
    with pytest.raises(ConventionError, match="fewer than the 3 prompt positions"):
        hf.check_step(past=2, step=1, mask_length=None, n_prompts=3)


# -- library internals without a public API: each test fails when the library moves one -------------


def test_the_trainer_still_has_the_private_checkpoint_methods_the_hooks_take_over():
    import inspect

    from transformers import Trainer

    expected = {
        "_save": ["self", "output_dir", "state_dict"],
        "_load_from_checkpoint": ["self", "resume_from_checkpoint", "model"],
        "_save_checkpoint": ["self", "model", "trial"],
        "_get_output_dir": ["self", "trial"],
        "_get_train_sampler": ["self", "train_dataset"],
    }
    for name, params in expected.items():
        method = getattr(Trainer, name, None)
        assert method is not None, (
            f"transformers.Trainer.{name} is gone: update hf_conventions.checkpoint_hooks_trainer"
        )
        assert list(inspect.signature(method).parameters) == params, f"Trainer.{name} changed its parameters"
    hooks = hf.checkpoint_hooks_trainer()
    assert issubclass(hooks, Trainer) and hooks is hf.checkpoint_hooks_trainer()
    clashes = {
        "save_weights",
        "load_weights",
        "save_checkpoint",
        "write_checkpoint",
        "checkpoint_parent",
        "train_sampler",
    } & set(dir(Trainer))
    assert not clashes, f"transformers.Trainer now has {clashes}: rename the hooks"


class Regression(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(2, 1)

    def forward(self, x, labels):
        return {"loss": torch.nn.functional.mse_loss(self.linear(x).squeeze(-1), labels)}


def hooked_trainer(run, staging, calls, max_steps=2, **extra):
    from transformers import TrainingArguments

    class Recording(hf.checkpoint_hooks_trainer()):
        def save_weights(self, output_dir, state_dict):
            calls.append(("save_weights", output_dir, state_dict))
            os.makedirs(output_dir, exist_ok=True)
            torch.save(self.model.state_dict(), os.path.join(output_dir, "weights.pt"))

        def load_weights(self, checkpoint, model):
            calls.append(("load_weights", checkpoint, model is self.model))
            model.load_state_dict(torch.load(os.path.join(checkpoint, "weights.pt"), weights_only=True))

        def save_checkpoint(self, model, trial=None):
            calls.append(("save_checkpoint", self.state.global_step))
            self.checkpoint_parent = str(staging)
            try:
                self.write_checkpoint(model, trial)
            finally:
                self.checkpoint_parent = None

    data = [{"x": torch.tensor([float(i), 1.0]), "labels": torch.tensor(float(i % 3))} for i in range(8)]
    args = TrainingArguments(
        output_dir=str(run),
        max_steps=max_steps,
        per_device_train_batch_size=2,
        save_strategy="steps",
        save_steps=1,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        remove_unused_columns=False,
        label_names=["labels"],
        **extra,
    )
    torch.manual_seed(0)
    return Recording(model=Regression(), args=args, train_dataset=data)


def test_the_trainer_saves_and_resumes_through_the_named_hooks(tmp_path):
    run, staging, calls = tmp_path / "run", tmp_path / "staging", []
    trainer = hooked_trainer(run, staging, calls)
    trainer.train()
    assert [c for c in calls if c[0] == "save_checkpoint"] == [("save_checkpoint", 1), ("save_checkpoint", 2)]
    weights = [c for c in calls if c[0] == "save_weights"]  # every save_model goes through save_weights
    assert weights == [("save_weights", str(staging / f"checkpoint-{s}"), None) for s in (1, 2)]
    for step in (1, 2):  # checkpoint_parent chose the folder of the whole checkpoint, Trainer state included
        assert {"weights.pt", "trainer_state.json", "optimizer.pt"} <= {
            p.name for p in (staging / f"checkpoint-{step}").iterdir()
        }
    assert not list(run.glob("checkpoint-*"))  # nothing outside it

    trainer.checkpoint_parent = str(tmp_path / "outside")  # a checkpoint outside the training loop
    trainer.write_checkpoint(trainer.model)
    assert (tmp_path / "outside" / "checkpoint-2" / "trainer_state.json").is_file()

    calls.clear()
    resumed = hooked_trainer(run, tmp_path / "staging2", calls, max_steps=3)
    resumed.train(resume_from_checkpoint=str(staging / "checkpoint-2"))
    assert calls[0] == ("load_weights", str(staging / "checkpoint-2"), True)
    assert resumed.state.global_step == 3 and ("save_checkpoint", 3) in calls


def test_attn_implementation_reads_what_the_public_argument_set():
    from transformers import LlamaConfig

    from m2pt_cli.backbones._tiny import tiny_llava_config

    for kernel in ("eager", "sdpa"):
        config = LlamaConfig(hidden_size=16, num_attention_heads=2, num_hidden_layers=1, attn_implementation=kernel)
        assert hf.attn_implementation(config) == kernel
        llava = tiny_llava_config(attn_implementation=kernel)  # the argument reaches the sub-configs too
        assert [hf.attn_implementation(c) for c in (llava, llava.text_config, llava.vision_config)] == [kernel] * 3


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=2
    )
    return LlamaForCausalLM(config)


def test_a_model_class_or_an_auto_class_builds_from_a_config_with_its_dtype_and_kernel():
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    for model_class in (LlamaForCausalLM, AutoModelForCausalLM):
        config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_attention_heads=2)
        with torch.device("meta"):
            model = hf.model_from_config(model_class, config, dtype=torch.bfloat16, attn_implementation="eager")
        assert type(model) is LlamaForCausalLM and hf.attn_implementation(model.config) == "eager"
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_activation_checkpointing_reaches_the_blocks_under_the_name_this_transformers_has():
    import warnings

    from transformers import PreTrainedModel

    model = tiny_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # never the deprecated name where the new one exists
        hf.enable_activation_checkpointing(model, {"use_reentrant": False})
        assert all(layer.gradient_checkpointing for layer in model.model.layers)
        hf.disable_activation_checkpointing(model)
        assert not any(layer.gradient_checkpointing for layer in model.model.layers)
    new = hasattr(PreTrainedModel, "activation_checkpointing_enable")
    assert new or hasattr(PreTrainedModel, "gradient_checkpointing_enable"), "neither checkpointing method exists"
    version = tuple(int(part) for part in hf.transformers_version().split(".")[:2])
    assert new == (version >= (5, 23)), "activation_checkpointing_enable appeared or went in another release"


def test_the_old_checkpointing_name_is_still_admitted():
    """When pyproject stops admitting transformers < 5.23, the fallback in hf_conventions goes."""
    from tests.test_supported_versions import lower_bounds

    bound = tuple(int(part) for part in lower_bounds()["transformers"].split("."))
    assert bound < (5, 23), "remove the gradient_checkpointing_* fallback from hf_conventions"


def test_a_refusal_to_run_repository_code_is_told_apart_from_other_errors(tmp_path):
    import json

    from transformers import AutoConfig

    config = {"model_type": "m2pt-test-custom", "auto_map": {"AutoConfig": "custom.CustomConfig"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as refused:
        AutoConfig.from_pretrained(str(tmp_path), trust_remote_code=False)
    assert hf.needs_remote_code(refused.value), str(refused.value)
    assert not hf.needs_remote_code(ValueError("Unrecognized model in /some/folder"))
    assert not hf.needs_remote_code(OSError("trust_remote_code"))


def test_open_progress_bars_are_closed():
    import io

    from tqdm import tqdm
    from tqdm.auto import tqdm as auto_tqdm  # what transformers uses

    bars = [tqdm(total=3, file=io.StringIO()), auto_tqdm(total=3, file=io.StringIO())]
    hf.close_progress_bars()
    assert all(bar.disable for bar in bars), "tqdm no longer lists its bars in tqdm._instances"


def test_transformers_still_maps_gguf_tensor_names_to_parameters():
    """Assumption 13: every parameter of a tiny Llama gets the GGUF name the gguf writer gives it
    (tests/gguf_factory.py), and gguf's name table is back to normal after the call."""
    import gguf
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.gguf_factory import FF, HEADS, KV_HEADS, LAYERS, WIDTH, llama_tensors, vocabulary

    config = LlamaConfig(
        hidden_size=WIDTH,
        intermediate_size=FF,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        vocab_size=len(vocabulary()),
        tie_word_embeddings=True,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    before = gguf.get_tensor_name_map
    names = hf.gguf_weight_names(model, "llama", config.to_dict())
    assert gguf.get_tensor_name_map is before
    mapped = {hf_name: gguf_name for gguf_name, hf_name in names.items() if gguf_name in llama_tensors()}
    assert sorted(mapped) == sorted(name for name, _ in model.named_parameters())
    assert mapped["model.layers.1.mlp.up_proj.weight"] == "blk.1.ffn_up.weight"
