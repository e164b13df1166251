"""``m2pt serve`` through the official ``openai`` client and raw HTTP, against a real server process.

Answers equal ``m2pt generate``'s, whatever a request was batched with and whether it streams; bad
requests get a 4xx JSON error naming the field and the server stays up; a full queue answers 503
with Retry-After and a client that goes away frees its slot; bad command lines are one line, exit 2.
"""

from __future__ import annotations

import json
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.cli.serving import Server, data_uri, user_message
from tests.helpers import m2pt

pytestmark = pytest.mark.slow  # a server process answering real HTTP clients

openai = pytest.importorskip("openai", reason="the dev extra installs the openai client")
pytest.importorskip("fastapi", reason="the serve extra: pip install -e '.[dev]'")

KEY = "test-key"


@pytest.fixture(scope="module")
def server(demo_adapter, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with Server(demo_adapter, "--api-key", KEY, "--max-image-mb", "0.01", log=log) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)


def generate(adapter, image, question) -> str:
    return m2pt(
        "generate", "--adapter", adapter, "--image", image, "--prompt", question, "--device", "cpu"
    ).stdout.strip()


def ask(client, image, question, stream=False, **extra) -> str:
    reply = client.chat.completions.create(
        model="demo-run", messages=[user_message(image, question)], stream=stream, **extra
    )
    if not stream:
        return reply.choices[0].message.content
    return "".join(chunk.choices[0].delta.content or "" for chunk in reply if chunk.choices)


def test_openai_client_gets_the_answer_of_m2pt_generate(server, client, demo_adapter, demo_images):
    image, question = demo_images[0]
    expected = generate(demo_adapter, image, question)
    assert [m.id for m in client.models.list().data] == ["demo-run"]
    assert ask(client, image, question) == expected
    assert ask(client, image, question, stream=True) == expected
    assert ask(client, image, question, temperature=0) == expected  # greedy asked for explicitly is fine


def test_streaming_is_server_sent_events_ending_with_done(server, demo_images):
    image, question = demo_images[1]
    body = {"model": "demo-run", "messages": [user_message(image, question)], "stream": True}
    with post(server, body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.read().decode().split("\n\n") if line]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_sixteen_concurrent_requests_each_get_their_sequential_answer(server, client, demo_images):
    """Different images and questions, so an answer taken from a batch neighbour would show."""
    wordings = ["What digit is shown in this image?", "Which digit is this?", "Read the handwritten digit."]
    cases = [(image, wordings[k % 3], k % 2 == 0) for k, (image, _) in enumerate(demo_images)]
    sequential = [ask(client, image, question) for image, question, _ in cases]
    assert len(set(sequential)) > 1, sequential  # the answers differ, so a mix-up would be seen
    before = server.health()
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda case: ask(client, case[0], case[1], stream=case[2]), cases))
    assert together == sequential
    after = server.health()
    assert after["answered"] - before["answered"] == 16
    print(f"16 requests from 4 threads ran in {after['batches'] - before['batches']} batches")


def post(server, body, headers=None, raw: bytes | None = None):
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"{server.url}/v1/chat/completions",
        data=data,
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}", **(headers or {})},
    )
    return urllib.request.urlopen(request, timeout=60)


def _not_png(tmp_path):
    return "data:image/png;base64,aGVsbG8gd29ybGQ="


def _big_png(tmp_path):
    from PIL import Image

    path = tmp_path / "noise.png"
    Image.frombytes("RGB", (100, 100), random.Random(0).randbytes(30_000)).save(path)  # 30 KB of noise > 0.01 MB
    return data_uri(path)


def _with_image(url_of):
    def make(tmp_path, image, question):
        parts = [{"type": "image_url", "image_url": {"url": url_of(tmp_path)}}, {"type": "text", "text": question}]
        return {"model": "demo-run", "messages": [{"role": "user", "content": parts}]}

    return make


def _asking(**fields):
    def make(tmp_path, image, question):
        return {"model": "demo-run", "messages": [user_message(image, question)], **fields}

    return make


BAD_REQUESTS = {
    "not an image": (_with_image(_not_png), 400, "messages[0].content[0].image_url", "not a readable image"),
    "image over --max-image-mb": (_with_image(_big_png), 413, "messages[0].content[0].image_url", "byte limit"),
    "remote URL": (
        _with_image(lambda tmp: "https://example.com/cat.png"),
        400,
        "messages[0].content[0].image_url",
        "never fetched",
    ),
    "local file without --allow-local-images": (
        _with_image(lambda tmp: "file:///etc/hostname"),
        400,
        "messages[0].content[0].image_url",
        "--allow-local-images",
    ),
    "missing messages": (lambda tmp, image, q: {"model": "demo-run"}, 400, "messages", "non-empty list"),
    "empty messages": (lambda tmp, image, q: {"model": "demo-run", "messages": []}, 400, "messages", "non-empty"),
    "unknown model": (_asking(model="gpt-4o"), 404, "model", "not served here"),
    "n > 1": (_asking(n=2), 400, "n", "greedily"),
    "temperature > 0": (_asking(temperature=0.8), 400, "temperature", "greedily"),
    "top_p < 1": (_asking(top_p=0.5), 400, "top_p", "greedily"),
    "max_tokens 0": (_asking(max_tokens=0), 400, "max_tokens", "integer from 1"),
    "no image": (
        lambda tmp, image, q: {"messages": [{"role": "user", "content": q}]},
        400,
        "messages",
        "no image",
    ),
    "system message": (
        lambda tmp, image, q: {"messages": [{"role": "system", "content": "Be brief."}, user_message(image, q)]},
        400,
        "messages[0].role",
        "system messages are not supported",
    ),
    "ends with the assistant": (
        lambda tmp, image, q: {"messages": [user_message(image, q), {"role": "assistant", "content": "5"}]},
        400,
        "messages[1].role",
        "last message",
    ),
}


@pytest.mark.bad_input
@pytest.mark.parametrize("case", list(BAD_REQUESTS), ids=list(BAD_REQUESTS))
def test_bad_request_is_a_json_4xx_naming_the_field(server, demo_images, tmp_path, case):
    make, status, param, needle = BAD_REQUESTS[case]
    image, question = demo_images[0]
    error = refused(server, make(tmp_path, image, question))
    assert (error.code, error.param) == (status, param), error.message
    assert needle in error.message and error.message.startswith(param), error.message
    assert server.health()["status"] == "ok"


class Refusal:
    def __init__(self, http_error: urllib.error.HTTPError) -> None:
        self.code = http_error.code
        self.headers = http_error.headers
        body = json.loads(http_error.read())["error"]
        self.param, self.message = body["param"], body["message"]


def refused(server, body=None, headers=None, raw=None) -> Refusal:
    with pytest.raises(urllib.error.HTTPError) as caught:
        post(server, body, headers, raw).close()
    return Refusal(caught.value)


@pytest.mark.bad_input
@pytest.mark.parametrize("given", [None, "wrong-key"])
def test_wrong_or_missing_api_key_is_401(server, demo_images, given):
    image, question = demo_images[0]
    header = {"Authorization": f"Bearer {given}"} if given else {"Authorization": ""}
    error = refused(server, {"messages": [user_message(image, question)]}, header)
    assert (error.code, error.param) == (401, "Authorization"), error.message
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(f"{server.url}/v1/models", timeout=10)
    assert caught.value.code == 401
    assert server.health()["status"] == "ok"


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("header", "status", "param"),
    [({"Content-Type": "text/plain"}, 415, "Content-Type"), ({"Host": "attacker.example:8000"}, 400, "Host")],
    ids=["not JSON (a cross-site form)", "foreign Host (DNS rebinding)"],
)
def test_requests_a_web_page_elsewhere_could_forge_are_refused(server, demo_images, header, status, param):
    image, question = demo_images[0]
    error = refused(server, {"messages": [user_message(image, question)]}, header)
    assert (error.code, error.param) == (status, param), error.message
    assert server.health()["status"] == "ok"


@pytest.mark.bad_input
def test_a_body_over_the_size_limit_is_413(server):
    limit = int(0.01 * (1 << 20) * 4 / 3) + (1 << 20)
    error = refused(server, raw=b"{" + b" " * (limit + 10) + b"}")
    assert (error.code, error.param) == (413, "body"), error.message
    assert server.health()["status"] == "ok"


def test_full_queue_is_503_with_retry_after_and_a_gone_client_frees_its_slot(demo_adapter, demo_images):
    """In-process (the worker held at a gate): queue of 2, batches of 1."""
    import uvicorn

    from m2pt_cli.model_source import load
    from m2pt_cli.serving.app import Settings, create_app
    from m2pt_cli.serving.engine import Engine
    from m2pt_cli.serving.requests import ImagePolicy
    from m2pt_cli.serving.server import listen

    loaded = load(demo_adapter / "adapter")
    gate, real = threading.Event(), loaded.generate
    loaded.generate = lambda *args, **kwargs: (gate.wait(60), real(*args, **kwargs))[1]
    engine = Engine(loaded, max_batch_size=1, queue_size=2).start()
    settings = Settings("demo-run", ImagePolicy(1 << 20, 1 << 24), 2 << 20)
    sock = listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(create_app(engine, settings), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    image, question = demo_images[0]
    body = json.dumps({"messages": [user_message(image, question)]}).encode()

    def call() -> bytes:
        request = urllib.request.Request(f"{url}/v1/chat/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.read()

    try:
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(call)  # the worker takes it and waits at the gate
            wait_for(lambda: engine.open_jobs == 1)
            gone = socket.create_connection(sock.getsockname()[:2])  # the second: queued, then its client leaves
            head = (
                "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            )
            gone.sendall(head.encode() + body)
            wait_for(lambda: engine.open_jobs == 2)
            with pytest.raises(urllib.error.HTTPError) as caught:
                call()
            assert caught.value.code == 503 and caught.value.headers["Retry-After"] == "1"
            assert json.loads(caught.value.read())["error"]["type"] == "server_busy"
            gone.close()
            wait_for(lambda: engine.open_jobs == 1)  # its slot is free again
            third = pool.submit(call)
            wait_for(lambda: engine.open_jobs == 2)
            gate.set()
            answers = {json.loads(f.result(60))["choices"][0]["message"]["content"] for f in (first, third)}
        assert answers == {loaded.answer([_open(image)], [question])[0].strip()}
        assert engine.rows_run == 2  # the request whose client left was never answered
    finally:
        gate.set()
        server.should_exit = True
        thread.join(10)
        engine.stop()
        sock.close()


def _open(path):
    from m2pt_cli.data.collate import open_image

    return open_image({"path": str(path)}, str(path))


def wait_for(condition, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.mark.bad_input
def test_serve_with_a_folder_that_is_no_adapter_is_one_line_exit_2(tmp_path):
    result = m2pt("serve", tmp_path, "--port", "0", check=False)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "no m2pt adapter here" in result.stderr


@pytest.mark.bad_input
def test_serve_on_a_port_in_use_is_one_line_exit_2(demo_adapter):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = m2pt("serve", demo_adapter, "--port", port, "--device", "cpu", check=False)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert f"--port {port}: 127.0.0.1:{port} is already in use" in result.stderr


def test_a_row_stops_at_its_own_limit_and_a_cancelled_row_changes_no_other(demo_adapter, demo_images):
    """In-process: one batch of 12 rows with limits 1, 3 and 64 (and one cancelled at the start)
    gives each row the text and finish reason it gets alone, and the deltas add up to the text."""
    import queue

    from m2pt_cli.model_source import load
    from m2pt_cli.serving.engine import Engine, Job

    loaded = load(demo_adapter / "adapter")
    engine = Engine(loaded, max_batch_size=16)

    def jobs():
        made = []
        for k, (image, question) in enumerate(demo_images[:12]):
            events = queue.Queue()
            made.append((Job(_open(image), loaded.prompt(question), question, (1, 3, 64)[k % 3], events.put), events))
        return made

    def results(made):
        out = []
        for _, events in made:
            items = [events.get_nowait() for _ in range(events.qsize())]
            deltas = "".join(v for kind, v in items if kind == "delta")
            done = [v for kind, v in items if kind == "done"]
            out.append((deltas, done[0].text, done[0].finish_reason) if done else None)
        return out

    alone = []
    for job, events in jobs():
        engine.run([job])
        alone.append(results([(job, events)])[0])
    batch = jobs()
    batch[5][0].cancelled.set()
    engine.run([job for job, _ in batch])
    together = results(batch)
    assert together[5] is None
    assert [r for k, r in enumerate(together) if k != 5] == [r for k, r in enumerate(alone) if k != 5]
    assert all(deltas == text for deltas, text, _ in alone)
    assert {reason for _, _, reason in alone} == {"stop", "length"}
