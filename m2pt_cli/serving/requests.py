"""OpenAI chat-completion request bodies -> one conversation about one image, checked field by field.

Every refusal is an ``ApiError`` naming the field (``param``), as the OpenAI API reports it.
Images come only from ``data:`` URIs (or local files where the server allows them); a remote URL
is refused, never fetched. Decoding goes through the one image policy (``m2pt_cli.data.images``).
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from m2pt_cli.data.images import ALLOWED_FORMATS, is_remote, open_image
from m2pt_cli.errors import UserError, quote
from m2pt_cli.serving.budget import unencodable

MAX_TOKENS_LIMIT = 4096
MAX_MESSAGES = 256  # turns in one conversation
# parameters that change sampling: refused unless they ask for what greedy decoding does anyway
GREEDY_VALUES: dict[str, tuple[Any, ...]] = {
    "temperature": (0, None),
    "top_p": (1, None),
    "frequency_penalty": (0, None),
    "presence_penalty": (0, None),
    "n": (1, None),
    "logprobs": (False, None),
    "top_logprobs": (0, None),
    "logit_bias": (None, {}),
    "stop": (None, [], ""),
    "tools": (None, []),
    "response_format": (None, {"type": "text"}),
}


class ApiError(Exception):
    """A request the server refuses: HTTP ``status``, the field at fault and why."""

    def __init__(self, status: int, param: str | None, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.param, self.message, self.kind = status, param, message, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


@dataclass(frozen=True)
class ImagePolicy:
    """What images the server accepts."""

    max_bytes: int
    max_pixels: int
    allow_local: bool = False


@dataclass
class Conversation:
    """A checked request: earlier turns, the new question, the image and where it sits.

    The image is still its ``url`` (a ``data:`` URI or a local path): it is decoded only once the
    request has passed every cheaper check (``load_image``).
    """

    turns: list[tuple[str, str]]
    question: str
    image_url: str
    image_param: str  # the field that carried it, for errors
    image_turn: int
    max_tokens: int
    stream: bool
    include_usage: bool = False

    @property
    def chars(self) -> int:
        """Characters of text in the conversation."""
        return len(self.question) + sum(len(q) + len(a) for q, a in self.turns)


def _refuse(param: str, message: str, status: int = 400) -> ApiError:
    return ApiError(status, param, f"{param}: {message}")


def parse(body: Any, model_name: str, default_max_tokens: int) -> Conversation:
    """The conversation a ``/v1/chat/completions`` body asks about; ``ApiError`` for anything else.

    Types are strict, as OpenAI's API checks them: a boolean is not a number (``temperature: false``
    and ``n: true`` are refused, not read as 0 and 1)."""
    if not isinstance(body, dict):
        raise ApiError(400, None, "the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != model_name:
        raise ApiError(
            404,
            "model",
            f"model: {quote(model)} is not served here (this server serves {model_name!r})",
            "model_not_found",
        )
    for name, allowed in GREEDY_VALUES.items():
        if name in body and not _greedy(body[name], allowed):
            raise _refuse(
                name,
                f"{quote(body[name])} is not supported: m2pt decodes greedily (leave it out or use {allowed[0]!r})",
            )
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _refuse("stream", "must be true or false")
    include_usage = _stream_options(body.get("stream_options"), stream)
    max_tokens = _max_tokens(body, default_max_tokens)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _refuse("messages", "must be a non-empty list of chat messages")
    if len(messages) > MAX_MESSAGES:
        raise _refuse("messages", f"{len(messages)} messages, more than this server takes ({MAX_MESSAGES})")
    conversation = _conversation(messages, max_tokens, stream)
    conversation.include_usage = include_usage
    return conversation


def _greedy(value: Any, allowed: tuple[Any, ...]) -> bool:
    """Whether ``value`` is one of ``allowed`` with the same type (``False`` is not ``0``)."""
    return any(value == a and (isinstance(value, bool) == isinstance(a, bool)) for a in allowed)


def _stream_options(options: Any, stream: bool) -> bool:
    """``stream_options.include_usage`` (only with ``stream: true``, as OpenAI's API has it)."""
    if options is None:
        return False
    if not stream:
        raise _refuse("stream_options", "only allowed with stream: true")
    if not isinstance(options, dict):
        raise _refuse("stream_options", 'must be an object such as {"include_usage": true}')
    include = options.get("include_usage", False)
    if not isinstance(include, bool):
        raise _refuse("stream_options.include_usage", "must be true or false")
    return include


def _max_tokens(body: dict[str, Any], default: int) -> int:
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_TOKENS_LIMIT:
            raise _refuse(name, f"must be an integer from 1 to {MAX_TOKENS_LIMIT}, got {quote(value)}")
        return value
    return default


def _conversation(messages: list[Any], max_tokens: int, stream: bool) -> Conversation:
    texts: list[str] = []
    image: tuple[str, str] | None = None
    image_turn = -1
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _refuse(where, "must be an object with 'role' and 'content'")
        role = message.get("role")
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise _refuse(
                f"{where}.role",
                f"expected {expected!r}, got {quote(role)} (user and assistant turns alternate, "
                "starting and ending with user; system messages are not supported)",
            )
        text, found = _content(message.get("content"), f"{where}.content", role == "user")
        if found is not None:
            if image is not None:
                raise _refuse(
                    f"{where}.content",
                    "a second image: the model takes one image per conversation "
                    "(start a new conversation for another image)",
                )
            image, image_turn = found, i // 2
        texts.append(text)
    if len(messages) % 2 == 0:
        raise _refuse(f"messages[{len(messages) - 1}].role", "the last message must be the user's")
    if image is None:
        raise _refuse("messages", "no image: one user message needs an image_url content part")
    turns = list(zip(texts[0:-1:2], texts[1:-1:2], strict=True))
    return Conversation(turns, texts[-1], image[0], image[1], image_turn, max_tokens, stream)


def _text(value: str, where: str) -> str:
    problem = unencodable(value)
    if problem:
        raise _refuse(where, problem)
    return value


def _content(content: Any, where: str, images_allowed: bool) -> tuple[str, tuple[str, str] | None]:
    """The text of one message and its image as (url, field) (None: none)."""
    if isinstance(content, str):
        return _text(content, where), None
    if not isinstance(content, list) or not content:
        raise _refuse(where, "must be a string or a non-empty list of content parts")
    texts, image = [], None
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(_text(part["text"], f"{at}.text"))
        elif kind == "image_url" and images_allowed:
            if image is not None:
                raise _refuse(at, "a second image: the model takes one image per conversation")
            ref = part.get("image_url")
            url = ref.get("url") if isinstance(ref, dict) else ref
            if not isinstance(url, str):
                raise _refuse(f"{at}.image_url", "needs a 'url' string")
            image = (url, f"{at}.image_url")
        else:
            allowed = "text or image_url" if images_allowed else "text"
            raise _refuse(at, f"unsupported content part {quote(kind)} (allowed here: {allowed})")
    return "\n".join(texts), image


_DATA = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[^;,]*)*)(?P<b64>;base64)?,", re.ASCII)


def load_image(url: str, where: str, policy: ImagePolicy, fit: tuple[int, int] | None = None) -> Any:
    """An RGB image from a ``data:`` URI (or a local file when ``policy.allow_local``), under the
    image policy, reduced towards ``fit`` (see ``open_image``); remote URLs are refused."""
    return decode_image(image_ref(url, where, policy), where, policy, fit)


def image_ref(url: str, where: str, policy: ImagePolicy) -> dict[str, Any]:
    """The image a URL names as ``{bytes, path}`` (nothing decoded), or the refusal."""
    if url.startswith("data:"):
        return {"bytes": _data_uri(url, where, policy), "path": None}
    if url.startswith("file://") or not is_remote(url):
        if not policy.allow_local:
            raise _refuse(where, "local files are not served (start the server with --allow-local-images)")
        path = Path(unquote(urlparse(url).path) if url.startswith("file://") else url)
        if path.is_file() and path.stat().st_size > policy.max_bytes:
            raise _refuse(where, f"the image is over the server's {policy.max_bytes} byte limit", 413)
        return {"bytes": None, "path": str(path)}
    raise _refuse(where, "remote URLs are never fetched: send the image as a data: URI (base64)")


def decode_image(ref: dict[str, Any], where: str, policy: ImagePolicy, fit: tuple[int, int] | None = None) -> Any:
    """``ref`` decoded as RGB under the image policy (``open_image``), or the refusal."""
    try:
        return open_image(ref, where, policy.max_pixels, fit)
    except UserError as exc:
        reason = str(exc).removeprefix(f"record {where}: ")
        if reason.startswith("cannot read its image"):
            reason = f"not a readable image (allowed: {', '.join(ALLOWED_FORMATS)})"
        raise _refuse(where, reason) from None


def _data_uri(url: str, where: str, policy: ImagePolicy) -> bytes:
    match = _DATA.match(url)
    if match is None or not match.group("b64"):
        raise _refuse(where, "a data: URI must be base64 (data:image/png;base64,...)")
    payload = url[match.end() :]
    if len(payload) // 4 * 3 > policy.max_bytes + 3:
        raise _refuse(where, f"the image is over the server's {policy.max_bytes} byte limit", 413)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise _refuse(where, "the data: URI is not valid base64") from None
    if len(data) > policy.max_bytes:
        raise _refuse(where, f"the image is over the server's {policy.max_bytes} byte limit", 413)
    return data
