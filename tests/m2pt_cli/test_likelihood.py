"""``m2pt_cli.likelihood``: the log-probability of a continuation after a question about an image, on
every backbone, equals a plain forward of the same M²PT model (prompts active) on the unpadded
sequence and a sum of log-softmax over the continuation's tokens; batched equals one by one; the
boundary rule holds for a continuation that starts with a space and one whose start merges with
the context's last token; and the limits stop a request before anything is computed."""

from __future__ import annotations

import pytest
import torch

from m2pt_cli.likelihood import Limits, OverLimit, continuation_logprobs, likelihoods, limits_of
from m2pt_cli.model_source import load
from tests.cases import images

QUESTIONS = ["What colour is it? Answer in one word:", "Is there a box? Answer yes or no:", "Say yes:"]
CONTINUATIONS = [" red", " yes", "no"]  # two start with a space, one does not
NO_PROMPTS = ("prompts.vision.length=0", "prompts.text.length=0")


def reference(loaded, image, question: str, continuation: str) -> tuple[float, bool, list[int]]:
    """Score, greedy flag and scored ids from one unpadded forward: the rendered prompt (trailing
    whitespace moved onto the continuation), the joint text through the processor, the scored tokens
    those after the longest common prefix with the context's own tokens."""
    backbone, processor = loaded.backbone, loaded.processor
    prompt = loaded.prompt(question)
    context = prompt.rstrip()
    continuation = prompt[len(context) :] + continuation
    joint = backbone.build_inputs(processor, [image], [context + continuation], [question])
    ids = joint["input_ids"][0].tolist()
    own = backbone.build_inputs(processor, [image], [context], [question])["input_ids"][0].tolist()
    start = 0
    while start < len(own) and ids[start] == own[start]:
        start += 1
    with torch.no_grad():
        logits = loaded.model(**joint).logits[0].float()
    total, greedy = 0.0, True
    for position in range(start, len(ids)):
        row = torch.log_softmax(logits[position - 1], dim=-1)
        total += float(row[ids[position]])
        greedy = greedy and int(logits[position - 1].argmax()) == ids[position]
    return total, greedy, ids[start:]


def merging_tokenizer(original):
    """``original`` (the tiny models' character tokenizer) as a BPE tokenizer with two merges, ``": "``
    and ``"es"``, whose ids two unused characters give up: ``"ASSISTANT:" + " yes"`` then tokenizes as
    ``..., ": ", "y", "es"`` while the context alone ends in ``":"``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = dict(original.get_vocab())
    specials = [token for token in vocab if len(token) > 1 and token.startswith("<") and token.endswith(">")]
    vocab[": "], vocab["es"] = vocab.pop("~"), vocab.pop("`")
    backend = Tokenizer(models.BPE(vocab, [(":", " "), ("e", "s")], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token=original.pad_token
    )
    tokenizer.chat_template = original.chat_template
    return tokenizer


@pytest.fixture(scope="module")
def loaded_case(case):
    return load(case.recipe, device="cpu")


def test_scores_equal_a_plain_forward_on_every_backbone(case, loaded_case):
    pictures = images(3)
    scores = likelihoods(loaded_case, pictures, QUESTIONS, CONTINUATIONS, batch_size=3)
    tokenizer = loaded_case.processor.tokenizer
    for picture, question, continuation, (score, greedy) in zip(
        pictures, QUESTIONS, CONTINUATIONS, scores, strict=True
    ):
        expected, expected_greedy, scored = reference(loaded_case, picture, question, continuation)
        # the character tokenizer never merges: exactly the continuation's characters are scored
        assert tokenizer.decode(scored) == continuation and len(scored) == len(continuation)
        assert score == pytest.approx(expected, abs=1e-4), (case.name, continuation)
        assert greedy == expected_greedy
        assert score < 0
    # one by one (no padding) gives the batch's numbers
    alone = likelihoods(loaded_case, pictures, QUESTIONS, CONTINUATIONS, batch_size=1)
    assert [s for s, _ in alone] == pytest.approx([s for s, _ in scores], abs=1e-4)
    assert [g for _, g in alone] == [g for _, g in scores]
    # the prompts count: the same base without them scores differently (the test can fail)
    bare = load(case.recipe, device="cpu", overrides=NO_PROMPTS)
    moved = [reference(bare, p, q, c)[0] for p, q, c in zip(pictures, QUESTIONS, CONTINUATIONS, strict=True)]
    assert all(abs(m - s) > 1e-3 for m, (s, _) in zip(moved, scores, strict=True)), (moved, scores)


def test_the_greedy_continuation_is_flagged_greedy(case, loaded_case):
    """The character the model ranks first after the prompt scores greedy; its second choice does not."""
    backbone, processor = loaded_case.backbone, loaded_case.processor
    found = 0
    for picture, question in zip(images(3), QUESTIONS, strict=True):
        context = backbone.build_inputs(processor, [picture], [loaded_case.prompt(question)], [question])
        with torch.no_grad():
            ranked = loaded_case.model(**context).logits[0, -1].argsort(descending=True)[:2].tolist()
        first, second = processor.tokenizer.convert_ids_to_tokens(ranked)
        if not all(len(t) == 1 and t.isprintable() and not t.isspace() for t in (first, second)):
            continue  # a special token or whitespace ranks first: not a text continuation
        pair = likelihoods(loaded_case, [picture] * 2, [question] * 2, [first, second])
        ((score, greedy), (other, not_greedy)) = pair
        assert greedy and not not_greedy, (case.name, first, second)
        assert score > other
        found += 1
    assert found, f"{case.name}: no question where a printable character ranks first"


def test_a_continuation_that_merges_with_the_contexts_last_token(case):
    """With a tokenizer that merges ``": "``, ``" yes"`` after a context ending in ``":"`` scores the
    merged token and what follows: the joint tokens after the longest common prefix."""
    loaded = load(case.recipe, device="cpu")
    loaded.processor.tokenizer = merging_tokenizer(loaded.processor.tokenizer)
    prompt = loaded.prompt(QUESTIONS[1])
    assert prompt.endswith(":")
    pictures = images(3)
    continuations = [" yes", "yes", " no"]
    scores = likelihoods(loaded, pictures, [QUESTIONS[1]] * 3, continuations, batch_size=3)
    tokenizer = loaded.processor.tokenizer
    for picture, continuation, (score, greedy) in zip(pictures, continuations, scores, strict=True):
        expected, expected_greedy, scored = reference(loaded, picture, QUESTIONS[1], continuation)
        if continuation.startswith(" "):  # merged: the context's ":" joins the scored tokens
            assert tokenizer.convert_ids_to_tokens(scored)[0] == ": "
            assert tokenizer.decode(scored) == ":" + continuation
        else:  # no merge at the boundary ("es" merges inside the continuation)
            assert tokenizer.convert_ids_to_tokens(scored) == ["y", "es"]
        assert score == pytest.approx(expected, abs=1e-4) and greedy == expected_greedy
    alone = likelihoods(loaded, pictures, [QUESTIONS[1]] * 3, continuations, batch_size=1)
    assert [s for s, _ in alone] == pytest.approx([s for s, _ in scores], abs=1e-4)


def test_trailing_whitespace_of_the_context_moves_onto_the_continuation(loaded_case):
    model, processor, backbone = loaded_case.model, loaded_case.processor, loaded_case.backbone
    picture, question = images(1)[0], QUESTIONS[1]
    prompt, limits = loaded_case.prompt(question), limits_of(loaded_case)
    spaced = continuation_logprobs(model, processor, backbone, [picture], [prompt + " "], [question], ["yes"], limits)
    plain = continuation_logprobs(model, processor, backbone, [picture], [prompt], [question], [" yes"], limits)
    assert spaced == plain


def test_limits_stop_a_request_before_the_model_runs(tiny_recipe):
    loaded = load(tiny_recipe, device="cpu")
    limits = limits_of(loaded)
    assert limits.max_sequence_tokens == 512 - 3  # the tiny Llama's positions less 3 text prompts
    calls = []
    loaded.model.register_forward_pre_hook(lambda *_: calls.append(1))
    picture, question = images(1)[0], QUESTIONS[0]
    with pytest.raises(OverLimit, match=r"continuation of 6 tokens is over the limit of 5 continuation tokens"):
        likelihoods(loaded, [picture], [question], [" green"], limits=Limits(509, 5, limits.max_token_chars))
    with pytest.raises(OverLimit, match=r"over the model's limit of 40 tokens"):
        likelihoods(loaded, [picture], [question], [" red"], limits=Limits(40, 5, limits.max_token_chars))
    # far too long to fit: refused from its length in characters, before it is tokenized
    with pytest.raises(OverLimit, match=r"a continuation of 100000 characters cannot fit the limit of 1024"):
        likelihoods(loaded, [picture], [question], ["x" * 100_000])
    with pytest.raises(OverLimit, match=r"cannot fit the model's 509 tokens"):
        likelihoods(loaded, [picture], ["y" * 10_000], [" red"])
    assert calls == []
    assert "\n" not in str(OverLimit("x"))
