"""Chat templates rendered within bounds on size and time (#36): a template that would build
gigabytes or run for hours is a one-line refusal in a fraction of a second (or at the time bound),
and a template within the bounds renders exactly as transformers' own sandbox renders it."""

from __future__ import annotations

import time

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment
from transformers import AutoTokenizer

from m2pt_cli import chat, jinja_bounds
from m2pt_cli.backbones.templates import PLAIN, VICUNA_V1
from m2pt_cli.errors import UserError
from tests.gguf_factory import CHAT_TEMPLATE

MESSAGES = [
    {"role": "user", "content": [{"type": "text", "text": "What digit is this?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "7"}]},
    {"role": "user", "content": [{"type": "text", "text": "And this one?"}]},
]

HOSTILE = {
    "repetition (folded at compile time by a plain sandbox)": "{% set pad = 'x' * 2500000000 %}hi",
    "doubling with ~": "{% set n = namespace(s='x') %}{% for i in range(40) %}{% set n.s = n.s ~ n.s %}{% endfor %}",
    "doubling with +": "{% set n = namespace(s='x') %}{% for i in range(40) %}{% set n.s = n.s + n.s %}{% endfor %}",
    "a list repeated": "{% set l = ['x' * 4000000] * 100 %}{{ l|join }}",
    "a list printed": "{% set l = ['x' * 4000000] * 100 %}{{ l }}",
    "a huge power": "{% set n = 10 %}{{ n ** 100000000 }}",
    "center": "{{ 'x'|center(1000000000) }}",
    "str.ljust": "{{ 'x'.ljust(1000000000) }}",
    "str.replace": "{% set s = 'x' * 100000 %}{{ s.replace('', s) }}",
    "the replace filter": "{% set s = 'x' * 100000 %}{{ s|replace('', s) }}",
    "the format filter": "{{ '%1000000000s'|format('x') }}",
    "% formatting": "{{ '%1000000000s' % 'x' }}",
    "str.format": "{{ '{:1000000000}'.format('x') }}",
    "indent": "{% set s = '\n' * 1000000 %}{{ s|indent(1000) }}",
    "tojson indent": "{{ messages|tojson(indent=100000) }}",
    "endless recursion": "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}",
    "the sandbox's own refusal": "{{ ''.__class__.__mro__ }}",
}
SLOW = {
    "nested loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "nested loops over a string": "{% set s = 'x' * 4000000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}",
    "exponential macro calls": (
        "{% macro f(n) %}{% if n > 0 %}{{ f(n-1) }}{{ f(n-1) }}{% endif %}{% endmacro %}{{ f(60) }}"
    ),
}


@pytest.fixture(scope="module")
def tokenizer(tiny_llava_dir):
    return AutoTokenizer.from_pretrained(tiny_llava_dir)


def render_with(tokenizer, template: str) -> str:
    tokenizer.chat_template = template
    return chat.render(tokenizer, MESSAGES, "processor", add_generation_prompt=True)


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_template_past_a_bound_is_a_quick_one_line_refusal(tokenizer, case):
    started = time.monotonic()
    with pytest.raises(UserError) as refusal:
        render_with(tokenizer, HOSTILE[case])
    message = str(refusal.value)
    assert message.startswith("model.chat_template: the model's own chat template cannot be rendered (")
    assert "\n" not in message and len(message) < 300 and message.isprintable()
    assert time.monotonic() - started < 5


def test_a_repetition_in_a_branch_never_taken_is_not_computed(tokenizer):
    """A plain sandbox folds ``'x' * 2500000000`` into a constant while compiling (2.5 GB) even in a
    branch that never runs; the bounded one leaves it to run time, where it never runs."""
    started = time.monotonic()
    assert render_with(tokenizer, "{% if false %}{% set pad = 'x' * 2500000000 %}{% endif %}hi") == "hi"
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("case", sorted(SLOW))
def test_a_template_that_runs_too_long_stops_at_the_time_bound(tokenizer, monkeypatch, case):
    monkeypatch.setattr(jinja_bounds, "SECONDS", 0.5)
    started = time.monotonic()
    with pytest.raises(UserError, match="ran for more than 0.5 s"):
        render_with(tokenizer, SLOW[case])
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("template", [CHAT_TEMPLATE, VICUNA_V1, PLAIN, "{{ ('%5s|' % 'ab') ~ ('x' * 3) }}"])
def test_a_template_within_the_bounds_renders_as_the_plain_sandbox_renders_it(tokenizer, template):
    """Reference: the same template compiled in Jinja's own sandbox as transformers configures it."""
    plain = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template)
    messages = [{**m, "content": m["content"][0]["text"]} for m in MESSAGES] if template == CHAT_TEMPLATE else None
    if messages is not None:
        tokenizer.chat_template = template
        ours = chat.render(tokenizer, [{**m} for m in messages], "processor", add_generation_prompt=True)
        assert ours == plain.render(messages=messages, add_generation_prompt=True)
    else:
        ours = render_with(tokenizer, template)
        reference = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
        assert ours == reference  # the same call, bounded either way now: compare with the plain render
        assert ours == plain.render(
            messages=MESSAGES, add_generation_prompt=True, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token
        )


def test_transformers_compiles_chat_templates_in_the_bounded_sandbox():
    from transformers.utils import chat_template_utils

    jinja_bounds.install()
    compiled = chat_template_utils._compile_jinja_template("{{ 'x' * 3 }}")
    assert isinstance(compiled.environment, jinja_bounds.BoundedSandbox)
    assert "tojson" in compiled.environment.filters  # transformers' own additions are kept
