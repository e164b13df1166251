"""Every assumption the prompt mechanism makes about transformers' calling conventions, in one place.

The decoder hooks in ``prompts.py`` sit between a Hugging Face causal LM and its decoder stack, so
they depend on how transformers calls that stack. These are the assumptions, each checked where it
can be; a call that breaks one raises :class:`ConventionError` instead of giving wrong answers.

1. Keyword names: the causal LM calls its decoder stack with keyword arguments only:
   ``inputs_embeds`` or ``input_ids``, ``attention_mask``, ``position_ids`` and the KV cache under
   ``cache`` (transformers >= 5.24) or ``past_key_values`` (5.20-5.23; deprecated in 5.24, removed
   in 5.40). Both spellings are read (:data:`CACHE_KEYWORDS`) and the cache is handed on under the
   one the stack's ``forward`` declares (:func:`route_cache`); a cache object under any other
   keyword, two different caches, or a stack that declares neither spelling is an error.
2. Cache object API: ``cache.get_seq_length()`` is the number of positions already cached,
   cumulative (sliding-window layers count every position seen), prompts included.
3. Mask shapes: the stack receives a 2D padding mask (batch, cached + new real tokens) or None; its
   blocks receive the model-built 4D mask (batch, 1, queries, keys) or None (sdpa's ``is_causal``).
4. Step lengths add up: a forward with an empty cache is a prefill; a forward with a non-empty
   cache is a decode step whose 2D mask covers exactly the cached real tokens plus the new ones.
   A mask that does not add up means the mechanism cannot see the cache (the transformers 5.24
   keyword rename was exactly that): :func:`check_step` raises.
5. Output classes: the stack returns a ``ModelOutput`` with ``last_hidden_state``, optionally
   ``hidden_states``, and its cache under ``cache`` or ``past_key_values``; after a forward the
   cache holds exactly the positions cached before plus this step's (:func:`check_cache_grew`).
6. Unknown keyword arguments given to the stack reach every decoder block (``**kwargs``), which
   is how per-forward prompt state travels from the stack to its blocks.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping, MutableMapping
from typing import Any

from torch import nn

# The decoder stack's KV-cache keyword, newest spelling first.
CACHE_KEYWORDS = ("cache", "past_key_values")


class ConventionError(RuntimeError):
    """transformers called the prompted model in a way the prompt mechanism does not expect.

    Never caught to carry on: the outputs would be wrong. The message names the transformers
    version and what was unexpected.
    """


def transformers_version() -> str:
    """The installed transformers version, for error messages."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("transformers")
    except PackageNotFoundError:
        return "unknown"


def _fail(what: str) -> ConventionError:
    return ConventionError(
        f"m2pt: unexpected call from transformers {transformers_version()}: {what}; the answer would be "
        "wrong, so m2pt stops (see m2pt_cli/hf_conventions.py for the supported versions)"
    )


def is_cache(value: Any) -> bool:
    """Whether ``value`` looks like a transformers KV cache object."""
    return callable(getattr(value, "get_seq_length", None))


def find_cache(kwargs: Mapping[str, Any]) -> Any | None:
    """The KV cache in a decoder stack's keyword arguments, under either spelling, or None.

    Raises:
        ConventionError: two different caches, or a cache object under an unknown keyword.
    """
    found = [kwargs[name] for name in CACHE_KEYWORDS if kwargs.get(name) is not None]
    if len(found) == 2 and found[0] is not found[1]:
        raise _fail(f"two different KV caches, as {CACHE_KEYWORDS[0]!r} and {CACHE_KEYWORDS[1]!r}")
    stray = [name for name, value in kwargs.items() if name not in CACHE_KEYWORDS and is_cache(value)]
    if stray:
        raise _fail(f"a KV cache under the unknown keyword {stray[0]!r} (known: {', '.join(CACHE_KEYWORDS)})")
    return found[0] if found else None


@functools.cache
def _declared_cache_keyword(stack_type: type) -> str | None:
    params = inspect.signature(stack_type.forward).parameters
    return next((name for name in CACHE_KEYWORDS if name in params), None)


def route_cache(stack: nn.Module, kwargs: MutableMapping[str, Any]) -> Any | None:
    """Find the KV cache in ``kwargs`` (either spelling) and put it under the keyword ``stack`` declares.

    Returns:
        the cache, or None.
    Raises:
        ConventionError: as :func:`find_cache`, or a cache for a stack that declares no cache keyword.
    """
    cache = find_cache(kwargs)
    if cache is None:
        return None
    keyword = _declared_cache_keyword(type(stack))
    if keyword is None:
        raise _fail(f"{type(stack).__name__}.forward takes none of the cache keywords {', '.join(CACHE_KEYWORDS)}")
    for name in CACHE_KEYWORDS:
        kwargs.pop(name, None)
    kwargs[keyword] = cache
    return cache


def cached_length(cache: Any | None) -> int:
    """Positions already in ``cache`` (prompts included); 0 for no cache."""
    return 0 if cache is None else int(cache.get_seq_length())


def output_cache(output: Any) -> Any | None:
    """The KV cache a model output carries (``cache`` or ``past_key_values``), or None."""
    for name in CACHE_KEYWORDS:
        value = getattr(output, name, None)
        if value is not None:
            return value
    return None


def check_step(past: int, step: int, mask_length: int | None, n_prompts: int) -> None:
    """Check that a forward's 2D mask covers the cached real tokens plus this step's tokens.

    Args:
        past: positions already cached (prompts included).
        step: real tokens in this forward.
        mask_length: columns of the caller's 2D padding mask (real tokens only), or None.
        n_prompts: prompt positions the first forward put in front of the sequence.
    """
    if past and past < n_prompts:
        raise _fail(f"a KV cache of {past} positions, fewer than the {n_prompts} prompt positions it must start with")
    if mask_length is None:
        return
    cached_real = past - n_prompts if past else 0
    if mask_length != cached_real + step:
        seen = f"a cache of {past} positions" if past else "no cache (a first forward)"
        raise _fail(
            f"a {step}-token step with {seen} has an attention mask over {mask_length} tokens, "
            f"expected {cached_real + step}; the KV cache may be passed under a keyword m2pt does not read"
        )


def check_cache_grew(output: Any, past: int, added: int) -> None:
    """Check that the cache in ``output`` holds ``past + added`` positions (when there is one)."""
    cache = output_cache(output)
    if cache is None or not is_cache(cache):
        return
    now = cached_length(cache)
    if now != past + added:
        raise _fail(
            f"the KV cache holds {now} positions after a step that began with {past} and added {added}; "
            "m2pt did not see the cache it was given"
        )
