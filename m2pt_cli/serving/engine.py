"""One loaded model behind a bounded queue and one worker thread that answers in batches.

Requests waiting when the worker is free go into one left-padded batch through
``LoadedModel.generate`` (the path ``m2pt generate`` and ``m2pt eval`` take), so a request's
answer does not depend on what it was batched with: each row stops at its own end of turn or its
own token limit, and a cancelled row stops at the next step. A batch that fails is answered again
row by row, so only a request that fails on its own gets an error.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from m2pt_cli.errors import first_line

GATHER_S = 0.01  # how long a batch waits for requests still being read (never when none are)
Event = tuple[str, Any]  # ("delta", text) | ("done", Answer) | ("error", message)


class Busy(Exception):
    """The queue is full; try again later."""


@dataclass
class Answer:
    """A finished answer: the text as ``m2pt generate`` prints it, and token counts."""

    text: str
    finish_reason: str  # "stop" (end of turn) or "length" (the request's token limit)
    prompt_tokens: int
    completion_tokens: int


@dataclass(eq=False)
class Job:
    """One conversation to answer: a rendered prompt, its image, and where its events go.

    ``emit`` is called from the worker thread with each event (the caller hands them on to its own
    thread or event loop).
    """

    image: Any
    prompt: str
    request: str
    max_new_tokens: int
    emit: Callable[[Event], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    released: bool = False


class TextStream:
    """The decoded answer of one row as it grows, handed out as text deltas whose concatenation is
    the final answer (surrounding whitespace dropped, as ``m2pt generate`` strips it)."""

    def __init__(self, tokenizer: Any, sent: str = "") -> None:
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.sent = sent  # text already handed out (by an earlier try at the same answer)

    def text(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True).strip()

    def push(self, token: int) -> str:
        """Add ``token``; the new text that is safe to show (held back: trailing whitespace, a
        partial UTF-8 character, text that a later token rewrote)."""
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True).lstrip().rstrip()
        if text.endswith("\ufffd") or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta

    def rest(self) -> str:
        """What is left to send once the answer is complete."""
        text = self.text()
        return text[len(self.sent) :] if text.startswith(self.sent) else ""


class BatchRows:
    """A transformers streamer and stopping criterion for one batch: routes each step's tokens to
    their jobs and ends a row at its own token limit or when its job is cancelled."""

    def __init__(self, jobs: list[Job], tokenizer: Any, stop_ids: set[int], sent: list[str] | None = None) -> None:
        self.jobs = jobs
        self.streams = [TextStream(tokenizer, text) for text in (sent or [""] * len(jobs))]
        self.stop_ids = stop_ids
        self.pad_id = tokenizer.pad_token_id
        self.finish = [""] * len(jobs)  # "" while running, then "stop" / "length" / "cancelled"
        self.prompt_tokens = [0] * len(jobs)
        self.prompt_length: int | None = None

    # -- BaseStreamer ------------------------------------------------------------------------
    def put(self, value: Any) -> None:
        if self.prompt_length is None:  # the padded prompts come first
            self.prompt_length = int(value.shape[-1])
            self.prompt_tokens = [int((row != self.pad_id).sum()) for row in value.reshape(len(self.jobs), -1)]
            return
        for i, token in enumerate(value.reshape(-1).tolist()):
            job = self.jobs[i]
            if self.finish[i]:
                continue
            if job.cancelled.is_set():
                self.finish[i] = "cancelled"
            elif token in self.stop_ids:
                self.finish[i] = "stop"
            else:
                delta = self.streams[i].push(token)
                if delta:
                    job.emit(("delta", delta))
                if len(self.streams[i].tokens) >= job.max_new_tokens:
                    self.finish[i] = "length"
            if self.finish[i]:
                self._done(i)

    def end(self) -> None:
        for i in range(len(self.jobs)):
            if not self.finish[i]:
                self.finish[i] = "length"
                self._done(i)

    def _done(self, i: int) -> None:
        job, stream = self.jobs[i], self.streams[i]
        if self.finish[i] == "cancelled":
            return
        rest = stream.rest()
        if rest:
            job.emit(("delta", rest))
        answer = Answer(stream.text(), self.finish[i], self.prompt_tokens[i], len(stream.tokens))
        job.emit(("done", answer))

    # -- StoppingCriteria --------------------------------------------------------------------
    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        new = input_ids.shape[1] - (self.prompt_length or 0)
        done = [job.cancelled.is_set() or new >= job.max_new_tokens for job in self.jobs]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class Engine:
    """A queue of at most ``queue_size`` unfinished jobs in front of ``loaded`` (a ``LoadedModel``),
    answered by one worker thread in batches of up to ``max_batch_size``."""

    def __init__(self, loaded: Any, max_batch_size: int = 8, queue_size: int = 64, gather_s: float = GATHER_S) -> None:
        self.loaded = loaded
        self.max_batch_size = max_batch_size
        self.queue_size = queue_size
        self.gather_s = gather_s
        self._arriving = 0  # requests being read and checked, about to be submitted
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._open = 0  # submitted jobs not yet finished or cancelled
        self._thread = threading.Thread(target=self._work, name="m2pt-engine", daemon=True)
        self.batches_run = 0  # statistics for /health
        self.rows_run = 0
        self.largest_batch = 0

    def start(self) -> Engine:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    @property
    def open_jobs(self) -> int:
        return self._open

    @property
    def full(self) -> bool:
        """True while ``submit`` would raise ``Busy``."""
        return self._open >= self.queue_size

    def busy_reason(self) -> str:
        return f"{self._open} requests are open (the queue holds {self.queue_size})"

    @contextmanager
    def arriving(self) -> Iterator[None]:
        """Around reading a request up to its ``submit``: the worker waits up to ``gather_s`` for
        such requests to join the batch it is forming (with none arriving, it starts at once)."""
        with self._lock:
            self._arriving += 1
        try:
            yield
        finally:
            with self._lock:
                self._arriving -= 1

    def submit(self, job: Job) -> None:
        """Queue ``job``; raises ``Busy`` when ``queue_size`` jobs are already open."""
        with self._lock:
            if self._open >= self.queue_size:
                raise Busy(self.busy_reason())
            self._open += 1
        self._queue.put(job)

    def cancel(self, job: Job) -> None:
        """Stop answering ``job`` (its client went away) and free its slot at once."""
        job.cancelled.set()
        self._release(job)

    def _release(self, job: Job) -> None:
        with self._lock:
            if not job.released:
                job.released = True
                self._open -= 1

    def _next_batch(self) -> list[Job] | None:
        first = self._queue.get()
        if first is None:
            return None
        batch = [first]
        deadline = time.monotonic() + self.gather_s
        while len(batch) < self.max_batch_size:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                wait = deadline - time.monotonic()
                if self._arriving == 0 or wait <= 0:
                    break
                try:
                    job = self._queue.get(timeout=min(wait, 0.001))
                except queue.Empty:
                    continue
            if job is None:
                self._queue.put(None)
                break
            batch.append(job)
        return [job for job in batch if not job.cancelled.is_set()]

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            if batch:
                self.run(batch)

    def run(self, batch: list[Job]) -> None:
        """Answer ``batch`` in one ``generate`` call (the worker's step; callable directly). If the
        call fails, each unfinished row is answered alone (its text continues where it stopped), so
        an error reaches only the requests that fail by themselves."""
        try:
            rows, error = self._generate(batch)
            if error is not None and len(batch) > 1:
                for i, job in enumerate(batch):
                    if not rows.finish[i]:
                        alone, failed = self._generate([job], [rows.streams[i].sent])
                        if failed is not None:
                            self._fail(job, failed)
            elif error is not None:
                for i, job in enumerate(batch):
                    if not rows.finish[i]:
                        self._fail(job, error)
        finally:
            for job in batch:
                self._release(job)

    def _generate(self, batch: list[Job], sent: list[str] | None = None) -> tuple[BatchRows, Exception | None]:
        """One ``generate`` call for ``batch``: its rows, and what it raised (None: nothing)."""
        from transformers import StoppingCriteriaList

        loaded = self.loaded
        tokenizer = loaded.processor.tokenizer
        stop_ids = {tokenizer.convert_tokens_to_ids(loaded.end_of_turn)}
        if tokenizer.eos_token_id is not None:
            stop_ids.add(tokenizer.eos_token_id)
        rows = BatchRows(batch, tokenizer, stop_ids, sent)
        self.batches_run += 1
        self.rows_run += len(batch)
        self.largest_batch = max(self.largest_batch, len(batch))
        try:
            loaded.generate(
                [job.image for job in batch],
                [job.prompt for job in batch],
                [job.request for job in batch],
                max(job.max_new_tokens for job in batch),
                streamer=rows,
                stopping_criteria=StoppingCriteriaList([rows]),
            )
            rows.end()
        except Exception as exc:  # noqa: BLE001 - reported to the requests it concerns, the worker lives on
            return rows, exc
        return rows, None

    @staticmethod
    def _fail(job: Job, exc: Exception) -> None:
        if not job.cancelled.is_set():
            job.emit(("error", f"generation failed: {type(exc).__name__}: {first_line(exc)}"))
