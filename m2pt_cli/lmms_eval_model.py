"""The ``m2pt`` model of lmms-eval (``pip install "m2pt[lmms-eval]"``): any m2pt adapter on lmms-eval's
generation tasks, answered by the path ``m2pt eval`` takes (the adapter's recipe and chat template,
greedy decoding, left-padded batches), and on its log-likelihood (multiple-choice) tasks, scored
through the same rendering (``m2pt_cli.likelihood``).

    lmms-eval --model m2pt --model_args adapter=RUN_OR_ADAPTER[,base=...,batch_size=8,device=...] --tasks mme
    accelerate launch --num_processes 2 -m lmms_eval --model m2pt --model_args adapter=... --tasks mme

Under ``accelerate launch`` (or torchrun) each process loads the model on its own device and answers
the share of the requests lmms-eval hands its rank; lmms-eval gathers the answers by rank.

lmms-eval finds the model through the entry-point group ``lmms_eval.models`` (``manifest``); only
lmms-eval imports this module.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from lmms_eval.utils import simple_parse_args_string

LOG = logging.getLogger("m2pt")
MODEL_ARGS = ("adapter", "base", "batch_size", "device", "trust_remote_code")
DEFAULT_MAX_NEW_TOKENS = 128  # for a task that names none


def manifest() -> ModelManifest:
    """What lmms-eval registers under ``--model m2pt``."""
    return ModelManifest(model_id="m2pt", simple_class_path="m2pt_cli.lmms_eval_model.M2PT")


class M2PT(lmms):
    """An m2pt adapter (or run, or checkpoint) on its base, as lmms-eval's ``lmms`` model.

    ``model_args``: ``adapter`` (required), ``base`` (hub id or folder of the base weights, default
    the adapter's), ``batch_size`` (default 8, or lmms-eval's ``--batch_size``), ``device`` (default
    the launcher's GPU for this process, else CUDA, else CPU), ``trust_remote_code``
    (the base's own code, only when you pass it).
    """

    is_simple = True

    def __init__(
        self,
        adapter: str | None = None,
        base: str | None = None,
        batch_size: int | str = 8,
        device: str | None = None,
        trust_remote_code: bool | str = False,
        max_batch_size: int | None = None,  # lmms-eval's own option; m2pt does not search batch sizes
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            names = ", ".join(sorted(unknown))
            raise ValueError(f"m2pt model_args: unknown {names} (allowed: {', '.join(MODEL_ARGS)})")
        if not adapter:
            raise ValueError(
                "m2pt model_args: adapter=RUN_OR_ADAPTER is required (a run, checkpoint or adapter folder)"
            )
        if not Path(adapter).is_dir():
            raise ValueError(f"m2pt model_args: adapter={adapter}: no such folder (a run, checkpoint or adapter)")
        try:
            self.batch_size = int(batch_size)
        except ValueError:
            raise ValueError(f"m2pt model_args: batch_size={batch_size!r} is not a whole number") from None
        if self.batch_size < 1:
            raise ValueError(f"m2pt model_args: batch_size={batch_size} must be 1 or more")
        from accelerate import Accelerator

        from m2pt_cli import devices
        from m2pt_cli.errors import UserError
        from m2pt_cli.model_source import load

        try:
            where = devices.resolve(device)
        except UserError as exc:
            raise ValueError(f"m2pt model_args: {exc}") from None
        # on CPU, processes started by a launcher (torchrun, accelerate launch --multi_gpu) join one
        # gloo group; without cpu=True accelerate would see no GPU and run each process alone
        self.accelerator = Accelerator(cpu=torch.device(where).type == "cpu")
        self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
        try:
            self.loaded = load(adapter, base=base, device=where, trust_remote_code=_flag(trust_remote_code))
        except UserError as exc:
            raise ValueError(f"m2pt model_args: {exc}") from None
        self._device = torch.device(where)

    @property
    def device(self) -> torch.device:
        """Where the model runs (lmms-eval puts its cross-rank counts here to gather them)."""
        return self._device

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> M2PT:
        """``model_args`` first, then lmms-eval's command-line options it does not name (its
        ``--batch_size`` defaults to 1, which would otherwise collide with ``batch_size=`` here)."""
        args = simple_parse_args_string(arg_string)
        extra = {key: value for key, value in (additional_config or {}).items() if value is not None}
        return cls(**{**extra, **args})

    # -- the lmms interface -------------------------------------------------------------------

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy answers in batches of ``batch_size`` (requests of one generation setting together),
        each row decoded until the task's stop strings (``until``) or its end of turn, cut at the
        first stop string, returned in the requests' order."""
        from tqdm import tqdm

        answers: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(index)
        bar = tqdm(total=len(requests), desc="m2pt", disable=self.rank != 0)
        for indices in groups.values():
            settings = requests[indices[0]].args[1]
            max_new_tokens, stops = self._settings(settings, requests[indices[0]].task_name)
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start : start + self.batch_size]
                questions = [requests[i].args[0] for i in batch]
                images = [self._image(requests[i]) for i in batch]
                prompts = [self.loaded.prompt(question) for question in questions]
                texts = self.loaded.generate(images, prompts, questions, max_new_tokens, stop_strings=stops)
                for i, text in zip(batch, texts, strict=True):
                    answers[i] = _cut(text, stops)
                    self.cache_hook.add_partial("generate_until", (requests[i].args[0], settings), answers[i])
                bar.update(len(batch))
        bar.close()
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """``(log-probability, is_greedy)`` of each request's continuation after its context, the
        context rendered as for answering (``m2pt_cli.likelihood``), in batches of ``batch_size``; a
        multiple-choice request's score is negated where lmms-eval picks the lowest
        (``_choice_scoring_takes_the_lowest``)."""
        from tqdm import tqdm

        from m2pt_cli.likelihood import OverLimit, likelihoods

        images, questions, continuations, choices = [], [], [], []
        for request in requests:
            if len(request.args) != 6:  # ("", choice): the unconditional half of acc_mutual_info
                raise ValueError(
                    f"m2pt: task {request.task_name} asks for the likelihood of a continuation without a question "
                    "or image (acc_mutual_info); m2pt scores answers to one image and question"
                )
            context, target, _, doc_id, task, split = request.args
            continuation = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
            if not isinstance(continuation, str):
                raise ValueError(
                    f"m2pt: task {task} gives document {doc_id} a {type(continuation).__name__} target; "
                    "loglikelihood scores a text continuation"
                )
            images.append(self._image(request))
            questions.append(context)
            continuations.append(continuation)
            choices.append(isinstance(target, str))  # multiple_choice passes "{delimiter}{choice}"
        bar = tqdm(total=len(requests), desc="m2pt loglikelihood", disable=self.rank != 0)
        try:
            scores = likelihoods(self.loaded, images, questions, continuations, self.batch_size, progress=bar.update)
        except OverLimit as exc:
            raise ValueError(f"m2pt: task {requests[0].task_name}: {exc}") from None
        finally:
            bar.close()
        for request, continuation, score in zip(requests, continuations, scores, strict=True):
            self.cache_hook.add_partial("loglikelihood", (request.args[0], continuation), score)
        if _choice_scoring_takes_the_lowest():
            scores = [(-s, g) if choice else (s, g) for (s, g), choice in zip(scores, choices, strict=True)]
        return _through_the_evaluator(scores)

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        task = requests[0].task_name if requests else "?"
        raise NotImplementedError(
            f"m2pt's lmms-eval model answers single-turn generate_until tasks; task {task} is multi-round"
        )

    # -- helpers ----------------------------------------------------------------------------------

    def _image(self, request: Instance) -> Any:
        """The request's one image, RGB (m2pt's models take one image per question)."""
        _, _, doc_to_visual, doc_id, task, split = request.args
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        visuals = [v for v in (visuals or []) if v is not None]
        if len(visuals) != 1 or not hasattr(visuals[0], "convert"):
            raise ValueError(
                f"m2pt: task {task} gives document {doc_id} {len(visuals)} visual input(s); m2pt answers "
                "about exactly one image per question"
            )
        return visuals[0].convert("RGB")

    def _settings(self, gen_kwargs: dict[str, Any], task: str) -> tuple[int, list[str]]:
        """Max new tokens and stop strings of a task's ``generation_kwargs`` (decoding stays greedy)."""
        sampling = gen_kwargs.get("do_sample") or float(gen_kwargs.get("temperature") or 0) > 0
        if sampling or int(gen_kwargs.get("num_beams") or 1) > 1:
            LOG.warning("m2pt: task %s asks for sampling or beam search; m2pt decodes greedily", task)
        until = gen_kwargs.get("until") or []
        stops = [until] if isinstance(until, str) else [s for s in until if s]
        return int(gen_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS), stops


def _cut(text: str, stops: list[str]) -> str:
    """``text`` up to the first stop string (lmms-eval's contract for ``until``)."""
    for stop in stops:
        text = text.split(stop, 1)[0]
    return text


@functools.cache
def _choice_scoring_takes_the_lowest() -> bool:
    """Whether lmms-eval's multiple-choice scoring picks the choice with the lowest score: 0.7.3's
    ``ConfigurableTask.process_results`` takes ``np.argmin(lls)``, written for its models that return a
    loss (lmms-eval issue #370), while its perplexity reads log-probabilities. Where it does, a
    choice's score goes to lmms-eval as ``-log P`` (so it picks the likeliest choice); a
    ``loglikelihood`` task's continuation always gets ``log P``."""
    import inspect

    from lmms_eval.api.task import ConfigurableTask

    try:
        return "np.argmin(lls)" in inspect.getsource(ConfigurableTask.process_results)
    except (OSError, TypeError):
        return False


def _through_the_evaluator(scores: list[tuple[float, bool]]) -> list[Any]:
    """``scores`` as lmms-eval's evaluator passes them on to the task intact. lmms-eval 0.7.3 runs every
    model output through ``unwrap_generation_output``, which turns a ``(logprob, is_greedy)`` tuple
    into its ``str`` (its multiple-choice scoring then fails); a ``GenerationResult`` carrying the
    tuple passes through unchanged. Plain tuples where the evaluator keeps them."""
    from lmms_eval.api import instance

    unwrap = getattr(instance, "unwrap_generation_output", None)
    if unwrap is None or not isinstance(unwrap((0.0, True))[0], str):
        return scores
    return [instance.GenerationResult(text=score) for score in scores]  # type: ignore[arg-type]


def _flag(value: bool | str) -> bool:
    return value is True or str(value).lower() in ("1", "true", "yes")
