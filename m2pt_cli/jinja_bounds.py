"""Chat templates rendered with a bound on size and time.

A chat template is a program from the model's files (a GGUF file's ``tokenizer.chat_template``, a
hub repository's ``chat_template.jinja``). Jinja's sandbox keeps it away from Python's internals
and bounds ``range``, but not what it builds: ``{% set pad = 'x' * 2500000000 %}`` is even folded
into a constant when the template is compiled, and nested loops run for as long as they like.

:class:`BoundedSandbox` is transformers' ``ImmutableSandboxedEnvironment`` with

- no string, list or number bigger than :data:`MAX_CHARS` characters (or as many items / bits):
  ``*``, ``+``, ``**``, ``%`` and ``~`` are checked before they compute (and so are never folded at
  compile time), every call and filter before it runs (its arguments, and for the ones that grow
  text, such as ``replace``, ``indent``, ``center`` or ``join``, what it would produce) and after;
- at most :data:`MAX_CHARS` characters of output;
- at most :data:`SECONDS` seconds per render, checked at every loop iteration, call, attribute
  and item access.

Going past a bound raises Jinja's ``SecurityError``; :func:`m2pt_cli.chat.render` turns it into a
one-line refusal. :func:`install` makes transformers compile every chat template in it.
"""

from __future__ import annotations

import functools
import re
import time
from contextvars import ContextVar
from typing import Any

from jinja2 import nodes
from jinja2.compiler import CodeGenerator
from jinja2.environment import Template
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

MAX_CHARS = 4 << 20  # characters in any string a template builds, and in its output
MAX_WIDTH = 100_000  # a field width in a format string, an indent
MAX_BITS = 1 << 16  # bits in an integer a template computes
SECONDS = 10.0  # one render
LOOP = "m2pt_bounded_loop"

_DEADLINE: ContextVar[float | None] = ContextVar("m2pt_template_deadline", default=None)
_DIGITS = re.compile(r"\d+")


def _tick() -> None:
    deadline = _DEADLINE.get()
    if deadline is not None and time.monotonic() > deadline:
        raise SecurityError(f"the chat template ran for more than {SECONDS:g} s")


def size(value: Any, limit: int = MAX_CHARS, depth: int = 0) -> int:
    """About how many characters ``str(value)`` has, counting no further than ``limit``."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, bool) or value is None:
        return 5
    if isinstance(value, int):
        return value.bit_length() // 3 + 1
    if isinstance(value, float):
        return 24
    if depth > 64:
        return limit + 1
    if isinstance(value, dict):
        items = [item for pair in value.items() for item in pair]
    elif isinstance(value, (list, tuple, set, frozenset)):
        items = list(value)
    else:
        inner = getattr(value, "_Namespace__attrs", None)  # jinja's namespace() prints its dict
        return size(inner, limit, depth + 1) if isinstance(inner, dict) else 64
    total = 2
    for item in items:
        total += size(item, limit - total, depth + 1) + 2
        if total > limit:
            break
    return total


def _refuse(what: str, amount: int, unit: str = "characters") -> SecurityError:
    return SecurityError(f"the chat template {what} {amount:,} {unit} (at most {MAX_CHARS:,})")


def _check(value: Any, what: str) -> Any:
    amount = size(value)
    if amount > MAX_CHARS:
        raise _refuse(what, amount)
    return value


def _check_format(text: Any) -> None:
    """A format string's widths and precisions (``%9999999s``, ``{:9999999}``) are bounded."""
    if isinstance(text, str) and any(int(run) > MAX_WIDTH for run in _DIGITS.findall(text)):
        raise SecurityError(f"the chat template formats with a width over {MAX_WIDTH:,}")


def _check_ints(args: tuple, kwargs: dict) -> None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_CHARS:
            raise SecurityError(f"the chat template passes {value} to a call (at most {MAX_CHARS:,})")


def _estimate(name: str, args: tuple, kwargs: dict) -> int:
    """What the text-growing call ``name`` (a str method or a filter) would produce, in characters."""
    text = args[0] if args and isinstance(args[0], str) else ""
    rest = args[1:]
    if name == "replace" and len(rest) >= 2:
        old, new = str(rest[0]), str(rest[1])
        hits = len(text) + 1 if not old else len(text) // len(old)
        return len(text) + hits * len(new)
    if name == "indent":
        width = rest[0] if rest else kwargs.get("width", 4)
        width = len(width) if isinstance(width, str) else int(width or 0)
        return len(text) + (text.count("\n") + 1) * width
    if name == "wordwrap":
        wrap = str(kwargs.get("wrapstring", rest[3] if len(rest) > 3 else "\n") or "\n")
        return len(text) * (1 + len(wrap))
    if name == "expandtabs":
        tab = rest[0] if rest else kwargs.get("tabsize", 8)
        return len(text) + text.count("\t") * int(tab)
    if name == "join" and args:
        items, sep = (args[1], args[0]) if isinstance(args[0], str) and len(args) > 1 else (args[0], "")
        sep = kwargs.get("d", rest[0] if rest and not isinstance(args[0], str) else sep)
        items = list(items) if not isinstance(items, str) else list(items)
        return sum(size(item) for item in items) + len(str(sep)) * max(len(items) - 1, 0)
    return 0


GROWING = {"replace", "indent", "wordwrap", "expandtabs", "join"}


def _bounded_filter(name: str, function: Any) -> Any:
    @functools.wraps(function)
    def bounded(*args: Any, **kwargs: Any) -> Any:
        _tick()
        values = [a for a in args if not _is_context(a)]
        _check_ints(tuple(values), kwargs)
        for value in (*values, *kwargs.values()):
            _check(value, f"passes {name} a value of")
        if name == "format" and values:
            _check_format(values[0])
        if name == "tojson" and int(kwargs.get("indent") or 0) > 16:
            raise SecurityError("the chat template asks tojson for an indent over 16")
        if name in GROWING and _estimate(name, tuple(values), kwargs) > MAX_CHARS:
            raise _refuse(f"would make {name} build", _estimate(name, tuple(values), kwargs))
        return _check(function(*args, **kwargs), f"made {name} build")

    bounded.m2pt_bounded = True
    return bounded


def _is_context(value: Any) -> bool:
    from jinja2.nodes import EvalContext
    from jinja2.runtime import Context

    return isinstance(value, (EvalContext, Context, ImmutableSandboxedEnvironment))


def _bounded_loop(iterable: Any) -> Any:
    for item in iterable:
        _tick()
        yield item


class BoundedCodeGenerator(CodeGenerator):
    """Compiles ``a ~ b`` into a call that checks the size of the result before joining."""

    def visit_Concat(self, node: nodes.Concat, frame: Any) -> None:
        self.write("environment.bounded_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class BoundedTemplate(Template):
    """A template whose ``render`` and ``generate`` run under the time bound."""

    def render(self, *args: Any, **kwargs: Any) -> str:
        token = _DEADLINE.set(time.monotonic() + SECONDS)
        try:
            return super().render(*args, **kwargs)
        finally:
            _DEADLINE.reset(token)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        token = _DEADLINE.set(time.monotonic() + SECONDS)
        try:
            yield from super().generate(*args, **kwargs)
        finally:
            _DEADLINE.reset(token)


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """transformers' chat template sandbox with bounds on sizes and time (see the module docstring)."""

    intercepted_binops = frozenset({"*", "**", "+", "%", "//"})
    code_generator_class = BoundedCodeGenerator
    template_class = BoundedTemplate

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("finalize", self._finalize_output)
        super().__init__(*args, **kwargs)
        self.globals[LOOP] = _bounded_loop

    @staticmethod
    def _finalize_output(value: Any) -> Any:
        return _check(value, "prints a value of")

    @staticmethod
    def concat(parts: Any) -> str:  # the whole output, and a macro's
        out, total = [], 0
        for part in parts:
            _tick()
            total += len(part)
            if total > MAX_CHARS:
                raise _refuse("writes more than", MAX_CHARS)
            out.append(part)
        return "".join(out)

    @staticmethod
    def bounded_concat(parts: tuple) -> str:
        _tick()
        total = sum(size(part) for part in parts)
        if total > MAX_CHARS:
            raise _refuse("joins with ~", total)
        return "".join(map(str, parts))

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _tick()
        if operator == "*":
            counts = [v for v in (left, right) if isinstance(v, int) and not isinstance(v, bool)]
            sized = [v for v in (left, right) if isinstance(v, (str, list, tuple))]
            if counts and sized and size(sized[0]) * max(counts[0], 0) > MAX_CHARS:
                raise _refuse("repeats to", size(sized[0]) * counts[0])
            if len(counts) == 2 and left.bit_length() + right.bit_length() > MAX_BITS:
                raise _refuse("multiplies to", left.bit_length() + right.bit_length(), "bits")
        elif operator == "**" and isinstance(left, int) and isinstance(right, int):
            if right > 0 and max(left.bit_length(), 1) * right > MAX_BITS:
                raise _refuse("raises to", max(left.bit_length(), 1) * right, "bits")
        elif operator == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
            if size(left) + size(right) > MAX_CHARS:
                raise _refuse("adds up to", size(left) + size(right))
        elif operator == "%" and isinstance(left, str):
            _check_format(left)
            _check(right, "formats a value of")
        try:
            result = super().call_binop(context, operator, left, right)
        except (OverflowError, MemoryError) as exc:
            raise SecurityError(f"the chat template computes a number too large ({type(exc).__name__})") from None
        return _check(result, "builds")

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 (as Jinja's)
        _tick()
        _check_ints(args, kwargs)
        for value in (*args, *kwargs.values()):
            _check(value, "passes a value of")
        inner = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format
        owner = getattr(inner, "__self__", None)
        name = getattr(inner, "__name__", "")
        if isinstance(owner, str):
            if name in ("format", "format_map", "__mod__"):
                _check_format(owner)
            if name in GROWING and _estimate(name, (owner, *args), kwargs) > MAX_CHARS:
                raise _refuse(f"would make str.{name} build", _estimate(name, (owner, *args), kwargs))
        return _check(super().call(__context, __obj, *args, **kwargs), "builds")

    def getattr(self, obj: Any, attribute: str) -> Any:
        _tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _tick()
        return super().getitem(obj, argument)

    def from_string(self, source: Any, globals: Any = None, template_class: Any = None) -> Any:  # noqa: A002
        """Compile ``source`` with every loop bounded in time and every filter in size."""
        for name, function in list(self.filters.items()):
            if not getattr(function, "m2pt_bounded", False):
                self.filters[name] = _bounded_filter(name, function)
        tree = self.parse(source) if isinstance(source, str) else source
        for loop in tree.find_all(nodes.For):
            loop.iter = nodes.Call(nodes.Name(LOOP, "load"), [loop.iter], [], None, None, lineno=loop.lineno)
        return super().from_string(tree, globals, template_class)


def install() -> None:
    """Make transformers compile every chat template in :class:`BoundedSandbox` (idempotent)."""
    from m2pt_cli import hf_conventions

    hf_conventions.bound_chat_templates(BoundedSandbox)


def probe(template: str) -> None:
    """Compile ``template`` and render it once on a short conversation, bounded.

    Raises:
        SecurityError: it goes past a bound or leaves the sandbox.
        TemplateSyntaxError: it does not compile.
        RecursionError: it recurses without end.
    (A template that refuses the sample conversation itself, ``raise_exception``, is not an error here.)
    """
    from jinja2.exceptions import TemplateError, TemplateSyntaxError
    from transformers.utils.chat_template_utils import render_jinja_template

    install()
    messages = [
        {"role": "user", "content": "What digit is this?"},
        {"role": "assistant", "content": "7"},
        {"role": "user", "content": "And this?"},
    ]
    try:
        render_jinja_template(conversations=[messages], chat_template=template, add_generation_prompt=True)
    except (SecurityError, TemplateSyntaxError):
        raise
    except (TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError):
        pass
