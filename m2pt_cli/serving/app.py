"""The HTTP face of the engine: an OpenAI-compatible ``/v1/chat/completions`` (with server-sent
events for ``stream: true``), ``/v1/models``, ``/health`` and the web page at ``/``."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from m2pt_cli.answering import PreparedImage
from m2pt_cli.chat import conversation_prompt
from m2pt_cli.serving.budget import Budget, OverBudget, budget_of, prompt_tokens
from m2pt_cli.serving.engine import Answer, Busy, Engine, Job
from m2pt_cli.serving.images import ImagePreparer
from m2pt_cli.serving.requests import ApiError, Conversation, ImagePolicy, parse

DISCONNECT_POLL_S = 0.25
DRAIN_FACTOR = 4  # a body up to this many times the limit is read (and dropped) before the 413
BODY_TIMEOUT_S = 30.0  # a body still arriving after this long is refused (408)


@dataclass(frozen=True)
class Settings:
    """What the server answers to and what it accepts."""

    model_name: str
    policy: ImagePolicy
    max_body_bytes: int
    api_key: str | None = None
    default_max_tokens: int = 64
    # names the Host header may give (None: any); a loopback server allows only loopback names, so
    # a web page elsewhere cannot reach it through DNS rebinding
    allowed_hosts: frozenset[str] | None = None
    max_prompt_tokens: int | None = None  # None: the recipe's data.max_length
    body_timeout_s: float = BODY_TIMEOUT_S


@dataclass(frozen=True)
class Checks:
    """What a request is checked with before it is queued: the token budget and the image preparer."""

    budget: Budget
    images: ImagePreparer


def create_app(engine: Engine, settings: Settings) -> FastAPI:
    """The application serving ``engine`` (already started) under ``settings``."""
    app = FastAPI(title="m2pt", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())
    checks = Checks(budget_of(engine.loaded, settings.max_prompt_tokens), ImagePreparer(engine.loaded, settings.policy))

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        headers = {"Retry-After": "1"} if exc.status == 503 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse(ApiError(exc.status_code, None, str(exc.detail)).body(), status_code=exc.status_code)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": settings.model_name,
            "open_requests": engine.open_jobs,
            "batches": engine.batches_run,
            "answered": engine.rows_run,
            "largest_batch": engine.largest_batch,
        }

    @app.get("/", response_class=HTMLResponse)
    async def page(request: Request) -> str:
        _check_host(request, settings.allowed_hosts)
        return (resources.files("m2pt_cli.serving") / "static" / "index.html").read_text(encoding="utf-8")

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        _check_host(request, settings.allowed_hosts)
        _check_key(request, settings.api_key)
        model = {"id": settings.model_name, "object": "model", "created": created, "owned_by": "m2pt"}
        return {"object": "list", "data": [model]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        _check_host(request, settings.allowed_hosts)
        _check_key(request, settings.api_key)
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            # a cross-site form or text/plain post cannot start work: browsers preflight JSON posts
            raise ApiError(415, "Content-Type", "Content-Type: must be application/json")
        if engine.full:  # refused before its body is read, parsed or its image decoded
            raise _busy(engine.busy_reason())
        with engine.arriving():
            job, events, conversation = await _job(request, engine, settings, checks)
        try:
            engine.submit(job)
        except Busy as exc:
            raise _busy(str(exc)) from None
        reply = Reply(settings.model_name, conversation.include_usage)
        if conversation.stream:
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return StreamingResponse(reply.events(engine, job, events), media_type="text/event-stream", headers=headers)
        return await reply.whole(engine, job, events, request)

    return app


def _busy(reason: str) -> ApiError:
    return ApiError(503, None, f"the server is busy ({reason}); retry later", "server_busy")


async def _job(
    request: Request, engine: Engine, settings: Settings, checks: Checks
) -> tuple[Job, asyncio.Queue, Conversation]:
    """The job a request asks for, the queue its events will arrive in, and the checked request."""
    raw = await _read_body(request, settings.max_body_bytes, settings.body_timeout_s)
    conversation, prompt, image = await run_in_threadpool(_checked, raw, engine, settings, checks)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def emit(event: tuple[str, Any]) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # the event loop closed (server shutting down)
            pass

    request_text = conversation.turns[0][0] if conversation.turns else conversation.question
    job = Job(image, prompt, request_text, conversation.max_tokens, emit)
    return job, events, conversation


def _check_host(request: Request, allowed: frozenset[str] | None) -> None:
    if allowed is None:
        return
    host = urlsplit("//" + request.headers.get("host", "")).hostname or ""
    if host not in allowed:
        names = ", ".join(sorted(allowed))
        raise ApiError(400, "Host", f"Host: {host!r} is not a name of this loopback server ({names})")


def _check_key(request: Request, api_key: str | None) -> None:
    if api_key is None:
        return
    given = request.headers.get("authorization", "")
    token = given[7:] if given[:7].lower() == "bearer " else ""
    if not hmac.compare_digest(token.encode(), api_key.encode()):
        reason = "wrong API key" if token else "missing API key (send 'Authorization: Bearer KEY')"
        raise ApiError(401, "Authorization", f"Authorization: {reason}", "authentication_error")


async def _read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The request body (413 over ``limit`` bytes, 408 when it takes over ``timeout_s`` to arrive)."""
    too_big = ApiError(413, "body", f"body: the request is over the server's {limit} byte limit")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > DRAIN_FACTOR * limit:
        raise too_big  # answered at once; the client may see its upload cut off
    chunks: list[bytes] = []

    async def read() -> int:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > DRAIN_FACTOR * limit:
                raise too_big
            if size <= limit:
                chunks.append(chunk)
        return size

    try:
        size = await asyncio.wait_for(read(), timeout_s)
    except asyncio.TimeoutError:
        raise ApiError(408, "body", f"body: not received within {timeout_s:g} s") from None
    if size > limit:  # read to the end (not kept), so the client reads the answer rather than a broken pipe
        raise too_big
    return b"".join(chunks)


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except RecursionError:  # the decoder stops at Python's recursion limit (1,000 levels)
        raise ApiError(400, "body", "body: JSON nested too deeply") from None
    except ValueError:
        raise ApiError(400, "body", "body: not valid JSON") from None


def _checked(raw: bytes, engine: Engine, settings: Settings, checks: Checks) -> tuple[Conversation, str, PreparedImage]:
    """The request's conversation, its prompt text and its prepared image (``ApiError`` if it is
    bad), cheapest checks first: the JSON, its fields, the text's length in characters, its length
    in tokens (with the chat template and the image's tokens) against the budget, then the image."""
    conversation = parse(_json(raw), settings.model_name, settings.default_max_tokens)
    loaded = engine.loaded
    try:
        checks.budget.check_chars(conversation.chars)
        prompt = conversation_prompt(
            loaded.processor,
            loaded.backbone,
            conversation.turns,
            conversation.question,
            loaded.template,
            conversation.image_turn,
        )
        checks.budget.check(prompt_tokens(loaded, prompt), conversation.max_tokens)
    except OverBudget as exc:
        raise ApiError(400, "messages", f"messages: {exc}", "invalid_request_error") from None
    except ValueError as exc:
        raise ApiError(400, "messages", f"messages: {exc}") from None
    return conversation, prompt, checks.images.prepare(conversation.image_url, conversation.image_param)


class Reply:
    """One completion in OpenAI's shapes: a whole ``chat.completion`` or ``chat.completion.chunk`` events."""

    def __init__(self, model_name: str, include_usage: bool = False) -> None:
        self.model = model_name
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.include_usage = include_usage

    def _base(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        chunk = {**self._base("chat.completion.chunk"), "choices": [choice]}
        if self.include_usage:
            chunk["usage"] = None  # as OpenAI's API sends it: null on every chunk but the last
        return f"data: {json.dumps(chunk)}\n\n"

    def _usage_chunk(self, answer: Answer) -> str:
        chunk = {**self._base("chat.completion.chunk"), "choices": [], "usage": _usage(answer)}
        return f"data: {json.dumps(chunk)}\n\n"

    async def events(self, engine: Engine, job: Job, events: asyncio.Queue) -> AsyncIterator[str]:
        """Server-sent events: the role, each text delta, the finish reason, the usage (with
        ``stream_options.include_usage``), then ``[DONE]``; a client that goes away cancels the
        job (the response task is cancelled)."""
        finished = False
        try:
            yield self._chunk({"role": "assistant", "content": ""})
            while True:
                kind, value = await events.get()
                if kind == "delta":
                    yield self._chunk({"content": value})
                elif kind == "done":
                    finished = True
                    yield self._chunk({}, value.finish_reason)
                    if self.include_usage:
                        yield self._usage_chunk(value)
                    break
                else:
                    finished = True
                    yield f"data: {json.dumps(ApiError(500, None, value, 'server_error').body())}\n\n"
                    break
            yield "data: [DONE]\n\n"
        finally:
            if not finished:
                engine.cancel(job)

    async def whole(self, engine: Engine, job: Job, events: asyncio.Queue, request: Request) -> JSONResponse:
        """The finished answer as one ``chat.completion``; cancels the job if the client goes away."""
        try:
            while True:
                try:
                    kind, value = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        engine.cancel(job)
                        return JSONResponse({}, status_code=499)
                    continue
                if kind == "done":
                    return JSONResponse(self._completion(value))
                if kind == "error":
                    raise ApiError(500, None, value, "server_error")
        except asyncio.CancelledError:
            engine.cancel(job)
            raise

    def _completion(self, answer: Answer) -> dict[str, Any]:
        message = {"role": "assistant", "content": answer.text}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": answer.finish_reason}
        return {**self._base("chat.completion"), "choices": [choice], "usage": _usage(answer)}


def _usage(answer: Answer) -> dict[str, int]:
    return {
        "prompt_tokens": answer.prompt_tokens,
        "completion_tokens": answer.completion_tokens,
        "total_tokens": answer.prompt_tokens + answer.completion_tokens,
    }
