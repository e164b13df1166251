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

It is also the one place where m2pt touches a library's private names or leans on behaviour that no
public API offers; everything else uses public APIs only. Each such assumption is a named function
here, and ``tests/m2pt_cli/test_hf_conventions.py`` checks that the installed library still has it,
so an upgrade that moves it fails a test instead of m2pt:

7. Trainer checkpoints (:func:`checkpoint_hooks_trainer`): transformers' ``Trainer`` has no public
   hook to write only the adapter into a checkpoint (``_save``), read it back on resume
   (``_load_from_checkpoint``), choose the folder a checkpoint is written into (``_get_output_dir``)
   or save a checkpoint outside its loop (``_save_checkpoint``); nor to choose the training order
   beyond its own strategies (``_get_train_sampler``, which LLaVA's trainer overrides too).
8. The attention kernel a built model uses (:func:`attn_implementation`): ``config._attn_implementation``;
   a model class built from a config with ``dtype`` and ``attn_implementation`` honoured
   (:func:`model_from_config`): ``_from_config`` (Auto classes have the public ``from_config``).
9. Activation checkpointing (:func:`enable_activation_checkpointing`): ``activation_checkpointing_enable``
   since transformers 5.23, ``gradient_checkpointing_enable`` before (5.20-5.22; deprecated in 5.23,
   removed in v6).
10. Refused repository code (:func:`needs_remote_code`): transformers says a checkpoint needs its own
    code with a plain ``ValueError`` that names ``trust_remote_code``.
11. Open progress bars (:func:`close_progress_bars`): tqdm lists them only in ``tqdm.tqdm._instances``.
12. Stopping a vision encoder at the layer that is read (:func:`run_encoder_layers_up_to`): a CLIP-style
    encoder runs ``for layer in self.layers`` on each call, so a shorter ``layers`` list for the call
    runs fewer layers; the tower's ``hidden_states`` (``capture_outputs``) then has one entry per layer
    run plus the embeddings, and LLaVA indexes it from the end (``vision_feature_layer = -2``).
13. Which GGUF tensor becomes which parameter (:func:`gguf_weight_names`): transformers maps them in
    ``modeling_gguf_pytorch_utils.get_gguf_hf_weights_map`` with the architecture's processor from
    ``TENSOR_PROCESSORS``, looking up ``gguf.get_tensor_name_map`` at each call (memoized for the
    call); m2pt checks a GGUF file's tensors against it before converting.
14. The Jinja environment chat templates are compiled in (:func:`bound_chat_templates`):
    ``transformers.utils.chat_template_utils`` builds it from its module-level name
    ``ImmutableSandboxedEnvironment`` in ``_cached_compile_jinja_template`` and caches compiled
    templates in ``_compile_jinja_template``; m2pt puts its bounded subclass under that name.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # no torch at import: the CLI's error path may import this module (close_progress_bars)
    from torch import nn
    from torch.utils.hooks import RemovableHandle

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


# -- library internals without a public API (assumptions 7-14) -------------------------------------


@functools.cache
def checkpoint_hooks_trainer() -> type:
    """A ``transformers.Trainer`` subclass whose private checkpoint methods call public, named ones.

    Subclasses override these (each defaults to what the Trainer does itself):

    - ``save_weights(output_dir, state_dict)``: write the model's files into ``output_dir``, for every
      checkpoint and every ``save_model``; ``state_dict`` is the gathered full state dict under FSDP or
      DeepSpeed, else None (``Trainer._save``).
    - ``load_weights(checkpoint, model)``: read them back from a checkpoint folder on resume
      (``Trainer._load_from_checkpoint``).
    - ``save_checkpoint(model, trial=None)``: save a checkpoint; the Trainer calls it whenever its loop
      saves, and it may be called outside the loop (``Trainer._save_checkpoint``). The Trainer's own
      checkpoint writing is ``write_checkpoint(model, trial=None)``.
    - ``train_sampler(dataset)``: the training order's sampler (``Trainer._get_train_sampler``); the
      Trainer builds the DataLoader around it and accelerate deals its batches out to the processes.
    - ``checkpoint_parent``: while not None, the folder the Trainer writes ``checkpoint-N`` into
      instead of ``args.output_dir`` (``Trainer._get_output_dir``).

    Built on first use, so that importing this module does not import the Trainer.
    """
    from transformers import Trainer

    class CheckpointHooksTrainer(Trainer):
        checkpoint_parent: str | None = None

        def save_weights(self, output_dir: str, state_dict: dict | None) -> None:
            super()._save(output_dir, state_dict=state_dict)

        def load_weights(self, checkpoint: str, model: nn.Module) -> None:
            super()._load_from_checkpoint(checkpoint, model)

        def save_checkpoint(self, model: nn.Module, trial: Any = None) -> None:
            self.write_checkpoint(model, trial)

        def write_checkpoint(self, model: nn.Module, trial: Any = None) -> None:
            super()._save_checkpoint(model, trial)

        def train_sampler(self, dataset: Any) -> Any:
            return super()._get_train_sampler(dataset)

        # the Trainer's private methods, each handed to its named counterpart above
        def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
            self.save_weights(output_dir or self.args.output_dir, state_dict)

        def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
            self.load_weights(resume_from_checkpoint, model if model is not None else self.model)

        def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
            self.save_checkpoint(model, trial)

        def _get_train_sampler(self, train_dataset: Any = None) -> Any:
            return self.train_sampler(train_dataset if train_dataset is not None else self.train_dataset)

        def _get_output_dir(self, trial: Any) -> str:
            return self.checkpoint_parent if self.checkpoint_parent is not None else super()._get_output_dir(trial)

    return CheckpointHooksTrainer


def model_from_config(model_class: Any, config: Any, **kwargs: Any) -> nn.Module:
    """``model_class`` built from ``config`` with fresh weights; ``kwargs`` as ``from_pretrained`` takes
    them (``dtype``, ``attn_implementation``).

    An Auto class has the public ``from_config``; a model class (``LlavaForConditionalGeneration``) has
    only ``_from_config``, since its constructor alone ignores ``dtype`` and ``attn_implementation``.
    """
    if hasattr(model_class, "from_config"):
        return model_class.from_config(config, **kwargs)
    return model_class._from_config(config, **kwargs)


def attn_implementation(config: Any) -> str | None:
    """The attention kernel (``sdpa``, ``eager``, ...) a model built from ``config`` runs.

    Setting it has a public way (``attn_implementation=`` to a config, ``from_pretrained`` or
    ``from_config``); reading it has none but ``config._attn_implementation``.
    """
    return config._attn_implementation


def enable_activation_checkpointing(model: nn.Module, checkpoint_kwargs: dict | None = None, **options: Any) -> None:
    """Recompute ``model``'s activations in backward; ``checkpoint_kwargs`` go to ``torch.utils.checkpoint``.

    ``options`` (``every_n_layers``, ``offload``) reach ``activation_checkpointing_enable`` (transformers
    >= 5.23, and m2pt's own models); transformers 5.20-5.22 are called by the older name without them.
    """
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpoint_kwargs, **options)
    else:  # transformers 5.20-5.22; remove when pyproject's lower bound reaches 5.23
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs)


def drop_input_require_grads(model: nn.Module) -> None:
    """Remove the hooks with which transformers' checkpointing makes every input embedding's output
    require a gradient (``enable_input_require_grads``, on each sub-model: the LLM's and the vision
    tower's). Reentrant checkpointing needs them; non-reentrant does not, and with them a frozen
    vision tower back-propagates for nothing (text-only prompts, LoRA on the LLM)."""
    if hasattr(model, "disable_input_require_grads"):
        model.disable_input_require_grads()


def disable_activation_checkpointing(model: nn.Module) -> None:
    """Undo :func:`enable_activation_checkpointing`."""
    if hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:  # transformers 5.20-5.22
        model.gradient_checkpointing_disable()


def needs_remote_code(exc: BaseException) -> bool:
    """Whether ``exc`` is transformers refusing a checkpoint because it needs the code in its repository
    (``trust_remote_code`` not granted): a plain ``ValueError`` whose message names the argument."""
    return isinstance(exc, ValueError) and "trust_remote_code" in str(exc)


def close_progress_bars() -> None:
    """Close every open tqdm progress bar (so that a message starts on a line of its own).

    tqdm keeps its open bars in ``tqdm.tqdm._instances`` and offers no public list of them. Nothing
    to do (and nothing imported) when tqdm was never imported.
    """
    module = sys.modules.get("tqdm")
    if module is None:
        return
    for bar in list(getattr(module.tqdm, "_instances", ())):
        bar.close()


def run_encoder_layers_up_to(tower: nn.Module, encoder: nn.Module, keep: int) -> list[RemovableHandle]:
    """Whenever ``tower`` runs, let ``encoder`` run only the first ``keep`` of its ``layers``.

    For the call only: ``encoder.layers`` is a ``ModuleList`` of the first ``keep`` layers while
    ``tower`` runs and the full list again after it (also when the call raises), so the model's
    modules, weights, state dict and hooks are never changed. The tower's ``hidden_states`` are
    padded with ``None`` for the layers not run, so an index counted from the end still picks the
    same layer. Returns the hook handles (none when ``keep`` is every layer).

    Raises:
        ConventionError: ``encoder.layers`` is not a ``ModuleList`` of more than ``keep`` layers, it
            was replaced by someone else, or the tower returned hidden states of another count.
    """
    from torch import nn

    full = getattr(encoder, "layers", None)
    if not isinstance(full, nn.ModuleList):
        raise _fail(f"{type(encoder).__name__}.layers is {type(full).__name__}, not the ModuleList it runs")
    if not 0 < keep <= len(full):
        raise ValueError(f"keep must be 1..{len(full)} layers; got {keep}")
    if keep == len(full):
        return []
    short, skipped = nn.ModuleList(list(full)[:keep]), len(full) - keep

    def shorten(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if encoder.layers is not full:
            raise _fail(f"{type(encoder).__name__}.layers was replaced while m2pt stops it after {keep} layers")
        encoder.layers = short

    def restore(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if encoder.layers is short:
            encoder.layers = full
        hidden = getattr(output, "hidden_states", None)
        if hidden is None:
            return output
        if len(hidden) != keep + 1:
            count = f"{len(hidden)} hidden states after {keep} layers, not {keep + 1}"
            raise _fail(f"{type(tower).__name__} returned {count}")
        output.hidden_states = (*hidden, *([None] * skipped))
        return output

    return [
        tower.register_forward_pre_hook(shorten, with_kwargs=True),
        tower.register_forward_hook(restore, with_kwargs=True, always_call=True),
    ]


def gguf_weight_names(model: nn.Module, architecture: str, config: dict[str, Any]) -> dict[str, str]:
    """GGUF tensor name -> parameter name of ``model``, as transformers maps them when it loads a GGUF
    file of ``architecture`` whose metadata gave ``config``."""
    import gguf
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    processor = gguf_utils.TENSOR_PROCESSORS.get(architecture, gguf_utils.TensorProcessor)(config=config)
    # transformers builds gguf's name table again for every submodule (hundreds of times, 0.05 s each);
    # it depends only on the architecture and layer count, so it is built once for the call
    original = gguf.get_tensor_name_map
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original)
    try:
        return gguf_utils.get_gguf_hf_weights_map(model, processor)
    finally:
        gguf.get_tensor_name_map = original


def bound_chat_templates(environment_class: type) -> None:
    """Compile every chat template transformers renders from now on in ``environment_class`` (a
    subclass of Jinja's ``ImmutableSandboxedEnvironment``), dropping templates it compiled before.
    Idempotent."""
    from transformers.utils import chat_template_utils as utils

    if utils.ImmutableSandboxedEnvironment is environment_class:
        return
    if not issubclass(environment_class, utils.ImmutableSandboxedEnvironment):
        raise TypeError(f"{environment_class.__name__} must subclass ImmutableSandboxedEnvironment")
    utils.ImmutableSandboxedEnvironment = environment_class
    utils._compile_jinja_template.cache_clear()
