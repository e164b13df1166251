"""What ``m2pt serve`` checks before a request reaches the model, without a model: strict types
(a boolean is not a number), ``stream_options``, text that is not Unicode, JSON nested too deep,
the token budget's messages, images reduced towards the model's input size, and the uvicorn
protocol that drops a connection whose request head never arrives."""

from __future__ import annotations

import io
import json
import socket
import threading
import time

import pytest
from PIL import Image

from m2pt_cli.data.images import open_image
from m2pt_cli.serving.budget import Budget, OverBudget
from m2pt_cli.serving.requests import ApiError, parse

pytest.importorskip("fastapi", reason="the serve extra: pip install -e '.[dev]'")

IMAGE = "data:image/png;base64,AAAA"  # parse keeps the URL; it is decoded later


def body(**fields):
    message = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": IMAGE}}, "?"]}
    message["content"][1] = {"type": "text", "text": "What digit is shown?"}
    return {"model": "demo", "messages": [message], **fields}


def refusal(request) -> ApiError:
    with pytest.raises(ApiError) as caught:
        parse(request, "demo", 64)
    return caught.value


@pytest.mark.parametrize(
    ("field", "value"),
    [("temperature", False), ("n", True), ("top_p", True), ("top_logprobs", False), ("frequency_penalty", False)],
)
def test_a_boolean_where_a_number_belongs_is_refused(field, value):
    error = refusal(body(**{field: value}))
    assert (error.status, error.param) == (400, field), error.message
    assert repr(value) in error.message


@pytest.mark.parametrize(
    "fields", [{"temperature": 0}, {"temperature": 0.0}, {"n": 1}, {"top_p": 1.0}, {"logprobs": False}, {}]
)
def test_greedy_values_of_the_right_type_pass(fields):
    assert parse(body(**fields), "demo", 64).question == "What digit is shown?"


def test_stream_options_include_usage():
    assert parse(body(stream=True, stream_options={"include_usage": True}), "demo", 64).include_usage
    assert not parse(body(stream=True, stream_options={}), "demo", 64).include_usage
    assert not parse(body(stream=True), "demo", 64).include_usage
    for bad, param in [
        (body(stream_options={"include_usage": True}), "stream_options"),  # without stream: true
        (body(stream=True, stream_options={"include_usage": 1}), "stream_options.include_usage"),
        (body(stream=True, stream_options=[True]), "stream_options"),
    ]:
        error = refusal(bad)
        assert (error.status, error.param) == (400, param), error.message


def test_text_with_a_lone_surrogate_is_refused_naming_the_part():
    request = json.loads('{"messages": [{"role": "user", "content": [{"type": "text", "text": "a\\ud800b"}]}]}')
    error = refusal(request)
    assert (error.status, error.param) == (400, "messages[0].content[0].text"), error.message
    assert "lone surrogate" in error.message and "character 1" in error.message
    error = refusal(json.loads('{"messages": [{"role": "user", "content": "\\udfff"}]}'))
    assert error.param == "messages[0].content"


def test_json_nested_100000_deep_is_a_400_and_bad_json_too():
    from m2pt_cli.serving.app import _json

    for raw, needle in [(b"[" * 100_000 + b"]" * 100_000, "nested too deeply"), (b'{"a": ', "not valid JSON")]:
        with pytest.raises(ApiError) as caught:
            _json(raw)
        assert (caught.value.status, caught.value.param) == (400, "body") and needle in caught.value.message


def test_too_many_messages_is_refused_before_they_are_read():
    turns = [{"role": "user" if k % 2 == 0 else "assistant", "content": "x"} for k in range(1001)]
    error = refusal({"messages": turns})
    assert (error.status, error.param) == (400, "messages") and "1001 messages" in error.message


def test_budget_names_the_count_and_the_limit():
    budget = Budget(max_prompt_tokens=128, context=508, max_token_chars=7)
    budget.check(128, 380)  # exactly full: accepted
    with pytest.raises(OverBudget, match="the prompt is 129 tokens .* limit of 128"):
        budget.check(129, 1)
    with pytest.raises(
        OverBudget, match="100 tokens and max_tokens asks for 409 more: 509, over the model's context of 508"
    ):
        budget.check(100, 409)
    budget.check_chars(128 * 7 * 2)
    with pytest.raises(OverBudget, match="1000000 characters, more than a prompt of at most 128 tokens can hold"):
        budget.check_chars(1_000_000)


def png(size, colour=(200, 10, 10)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, "PNG")
    return out.getvalue()


def test_an_image_far_over_the_input_size_is_reduced_and_a_small_one_is_untouched():
    big = open_image({"bytes": png((4000, 3000)), "path": None}, "r", fit=(32, 32))
    assert big.mode == "RGB" and min(big.size) >= 64 and big.size[0] * big.size[1] <= 200 * 150  # 1/20 on a side
    photo = io.BytesIO()
    Image.new("RGB", (4000, 3000), (10, 200, 10)).save(photo, "JPEG")
    reduced = open_image({"bytes": photo.getvalue(), "path": None}, "r", fit=(32, 32))
    assert min(reduced.size) >= 64 and reduced.size[0] <= 200
    noise = Image.frombytes("RGB", (100, 60), bytes(range(256)) * 70 + bytes(100 * 60 * 3 - 256 * 70))
    data = io.BytesIO()
    noise.save(data, "PNG")
    ref = {"bytes": data.getvalue(), "path": None}
    assert open_image(ref, "r", fit=(32, 32)).tobytes() == open_image(ref, "r").tobytes()  # under 2x: as it is


def answer(connection: socket.socket) -> bytes:
    received = b""
    while not received.endswith(b"ok"):
        chunk = connection.recv(1000)
        assert chunk, received
        received += chunk
    return received


def test_a_connection_that_never_sends_a_whole_request_head_is_closed():
    """uvicorn alone keeps it open for ever; ``server_config``'s protocol closes it, also when a
    keep-alive connection starts its next request and stalls."""
    import uvicorn

    from m2pt_cli.serving.server import listen, server_config

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    sock = listen("127.0.0.1", 0)
    config = server_config(app, queue_size=4, header_timeout_s=0.5)
    config.timeout_keep_alive = 30  # so that only the head timeout can close the second connection
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    address = sock.getsockname()[:2]
    try:
        while not server.started:
            time.sleep(0.01)
        silent = socket.create_connection(address, timeout=10)
        slow = socket.create_connection(address, timeout=10)
        slow.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer(slow).endswith(b"ok")
        slow.sendall(b"GET / HTTP/1.1\r\nHo")  # the next request head, never finished
        started = time.monotonic()
        assert silent.recv(10) == b"" and slow.recv(10) == b""  # closed by the server
        assert time.monotonic() - started < 5
        with socket.create_connection(address, timeout=10) as fresh:  # the server still answers
            fresh.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert answer(fresh).endswith(b"ok")
        silent.close()
        slow.close()
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def test_a_body_that_trickles_in_is_a_408_and_one_over_the_limit_a_413():
    import asyncio

    from m2pt_cli.serving.app import _read_body

    class Trickle:
        def __init__(self, chunks, pause):
            self.headers, self.chunks, self.pause = {}, chunks, pause

        async def stream(self):
            for chunk in self.chunks:
                await asyncio.sleep(self.pause)
                yield chunk

    def read(request, limit=100, timeout=0.3):
        return asyncio.run(_read_body(request, limit, timeout))

    assert read(Trickle([b'{"a":', b" 1}"], 0.01)) == b'{"a": 1}'
    for request, status in [(Trickle([b"{"] * 50, 0.05), 408), (Trickle([b" " * 60] * 3, 0), 413)]:
        with pytest.raises(ApiError) as caught:
            read(request)
        assert (caught.value.status, caught.value.param) == (status, "body"), caught.value.message
