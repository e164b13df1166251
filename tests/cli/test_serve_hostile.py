"""``m2pt serve`` under hostile and heavy traffic: work per request is bounded before it is queued
(prompt tokens against ``--max-prompt-tokens`` and the model's context, images prepared to the
processor's input size), a request that cannot be answered fails alone, request types are strict,
``stream_options.include_usage`` is honoured, and a soak of well-formed and hostile clients leaves
every well-formed answer right, no 5xx, memory and file descriptors where they were.
"""

from __future__ import annotations

import json
import queue
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.cli.serving import Server
from tests.cli.soak import Soak, digit_cases, flat_png
from tests.cli.soak import data_uri as png_uri

pytestmark = pytest.mark.slow  # a server process answering real HTTP clients

pytest.importorskip("fastapi", reason="the serve extra: pip install -e '.[dev]'")

SOAK_SECONDS = 30  # the 2 minutes: python -m tests.cli.soak ADAPTER --seconds 120
CONTEXT = 512 - 4  # the demo LLM's max_position_embeddings less its 4 text prompts
MAX_LENGTH = 128  # the demo recipe's data.max_length: the default --max-prompt-tokens


@pytest.fixture(scope="module")
def server(demo_adapter, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-hostile") / "serve.log"
    with Server(demo_adapter, "--max-image-mb", "1", log=log) as running:
        yield running


@pytest.fixture(scope="module")
def loaded(demo_adapter):
    from m2pt_cli.model_source import load

    return load(demo_adapter / "adapter")


@pytest.fixture(scope="module")
def cases():
    return digit_cases(16)


@pytest.fixture(scope="module")
def expected(loaded, cases):
    """The greedy answers one at a time in this process, the path ``m2pt generate`` takes."""
    import io

    from PIL import Image

    images = [Image.open(io.BytesIO(png)).convert("RGB") for png, _ in cases]
    return [a.strip() for a in loaded.answer(images, [q for _, q in cases], batch_size=1)]


def post(server, body) -> tuple[int, dict]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(
        f"{server.url}/v1/chat/completions", data=raw, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def ask(image_uri: str, text: str, **fields) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": image_uri}}, {"type": "text", "text": text}]
    return {"messages": [{"role": "user", "content": parts}], **fields}


def test_the_prompt_token_count_is_checked_before_queueing_and_equals_the_models(server, cases):
    """A prompt is counted with the chat template and its image tokens: the count the server checks
    is exactly the model's (``usage.prompt_tokens``, counted by the worker from the padded batch),
    so max_tokens filling the context to the last token is accepted and one more is refused."""
    image = png_uri(cases[0][0])
    status, answer = post(server, ask(image, cases[0][1]))
    assert status == 200
    tokens = answer["usage"]["prompt_tokens"]
    assert tokens > 50  # the image's tokens are in it (the question alone is about 30 characters)
    room = CONTEXT - tokens
    status, _ = post(server, ask(image, cases[0][1], max_tokens=room))
    assert status == 200
    status, error = post(server, ask(image, cases[0][1], max_tokens=room + 1))
    assert status == 400 and error["error"]["param"] == "messages"
    assert f"the prompt is {tokens} tokens and max_tokens asks for {room + 1} more" in error["error"]["message"]
    assert f"context of {CONTEXT} tokens" in error["error"]["message"]
    long = "7" * 100  # the demo's tokenizer reads characters: 100 more tokens than a one-digit question
    status, error = post(server, ask(image, "7"))
    assert status == 200
    one = error["usage"]["prompt_tokens"]
    status, error = post(server, ask(image, long))
    assert status == 400
    assert f"the prompt is {one + 99} tokens" in error["error"]["message"]
    assert f"limit of {MAX_LENGTH} (--max-prompt-tokens)" in error["error"]["message"]
    status, error = post(server, ask(image, "7" * 1_000_000))  # refused from its length, never tokenized
    assert status == 400 and "1000000 characters, more than a prompt of at most 128 tokens" in error["error"]["message"]
    assert server.health()["answered"] >= 2


def test_a_queued_request_holds_the_prepared_image_not_the_bitmap(loaded):
    """An 8192 x 8192 PNG (decoded: 192 MiB) queues as the processor's 3 x 32 x 32 input, 12 KiB,
    and the demo's digits (8 x 8, under the input size) are prepared exactly as ``generate`` sees them."""
    import io

    from PIL import Image

    from m2pt_cli.answering import prepare_image
    from m2pt_cli.serving.images import ImagePreparer
    from m2pt_cli.serving.requests import ImagePolicy

    preparer = ImagePreparer(loaded, ImagePolicy(1 << 20, 8192 * 8192))
    prepared = preparer.prepare(png_uri(flat_png(8192)), "image")
    assert tuple(prepared.pixel_values.shape) == (1, 3, 32, 32) and prepared.pixel_values.nbytes == 12288
    png = digit_cases(1)[0][0]
    direct = prepare_image(loaded.processor, loaded.backbone, Image.open(io.BytesIO(png)).convert("RGB"))
    assert (preparer.prepare(png_uri(png), "image").pixel_values == direct.pixel_values).all()


def test_twelve_concurrent_requests_one_hostile_the_eleven_others_answered_right(server, cases, expected):
    """The hostile one (a lone surrogate in its text: it used to fail the tokenizer inside the
    worker, failing the whole batch) is refused alone with a 400 before it joins a batch."""
    bodies = [ask(png_uri(png), question) for png, question in cases[:12]]
    hostile = json.dumps(bodies[5]).replace(json.dumps(cases[5][1]), '"What \\ud800 digit?"').encode()
    bodies[5] = hostile
    before = server.health()
    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda body: post(server, body), bodies))
    assert results[5][0] == 400 and "lone surrogate" in results[5][1]["error"]["message"]
    answers = [
        (status, reply["choices"][0]["message"]["content"]) for k, (status, reply) in enumerate(results) if k != 5
    ]
    assert answers == [(200, answer) for k, answer in enumerate(expected[:12]) if k != 5]
    assert server.health()["answered"] - before["answered"] == 11


def test_a_batch_that_fails_is_answered_row_by_row_so_only_the_faulty_request_errs(loaded, cases, expected):
    """In-process, past the request checks: one of 12 jobs carries a prompt the tokenizer cannot
    encode, so the batch's ``generate`` fails; the worker answers the 12 alone, and only that job
    gets an error event."""
    import io

    from PIL import Image

    from m2pt_cli.serving.engine import Engine, Job

    engine = Engine(loaded, max_batch_size=16)
    jobs, events = [], []
    for k, (png, question) in enumerate(cases[:12]):
        prompt = loaded.prompt(question if k != 7 else "What \ud800 digit?")
        got: queue.Queue = queue.Queue()
        jobs.append(Job(Image.open(io.BytesIO(png)).convert("RGB"), prompt, question, 64, got.put))
        events.append(got)
    engine.run(jobs)
    outcomes = []
    for got in events:
        items = [got.get_nowait() for _ in range(got.qsize())]
        done = [value.text for kind, value in items if kind == "done"]
        errors = [value for kind, value in items if kind == "error"]
        outcomes.append(("done", done[0]) if done else ("error", errors[0][:40]) if errors else ("nothing", ""))
    assert outcomes[7][0] == "error", outcomes[7]
    assert [o for k, o in enumerate(outcomes) if k != 7] == [("done", a) for k, a in enumerate(expected[:12]) if k != 7]
    assert engine.batches_run == 1 + 12  # the failed batch, then each row alone


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("make", "param", "needle"),
    [
        (lambda image, q: b"[" * 100_000 + b"]" * 100_000, "body", "nested too deeply"),
        (lambda image, q: ask(image, q, temperature=False), "temperature", "False is not supported"),
        (lambda image, q: ask(image, q, n=True), "n", "True is not supported"),
        (lambda image, q: ask(image, q, stream_options={"include_usage": True}), "stream_options", "stream: true"),
    ],
    ids=["JSON 100,000 deep", "temperature false", "n true", "stream_options without stream"],
)
def test_strict_parsing_is_a_400_naming_the_field(server, cases, make, param, needle):
    status, error = post(server, make(png_uri(cases[0][0]), cases[0][1]))
    assert (status, error["error"]["param"]) == (400, param), error
    assert needle in error["error"]["message"]


def test_include_usage_sends_the_usage_chunk_before_done(server, cases, expected):
    """As OpenAI's API: every chunk has ``usage: null`` but one last chunk with no choices and the
    usage, then ``[DONE]``; the official client reads it."""
    openai = pytest.importorskip("openai", reason="the dev extra installs the openai client")

    png, question = cases[2]
    body = ask(png_uri(png), question, stream=True, stream_options={"include_usage": True})
    request = urllib.request.Request(
        f"{server.url}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        events = [e.removeprefix("data: ") for e in response.read().decode().split("\n\n") if e]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["usage"] is None for c in chunks[:-1]) and chunks[-1]["choices"] == []
    usage = chunks[-1]["usage"]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert text == expected[2]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > usage["prompt_tokens"]
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
    stream = client.chat.completions.create(
        model="demo-run",
        messages=[user_message_bytes(png, question)],
        stream=True,
        stream_options={"include_usage": True},
    )
    last = list(stream)[-1]
    assert last.choices == [] and last.usage.prompt_tokens == usage["prompt_tokens"]


def user_message_bytes(png: bytes, question: str) -> dict:
    return {
        "role": "user",
        "content": [{"type": "image_url", "image_url": {"url": png_uri(png)}}, {"type": "text", "text": question}],
    }


def test_soak_well_formed_answers_right_no_5xx_memory_and_fds_back(server, cases, expected):
    """16 clients for ``SOAK_SECONDS``: well-formed requests (half streamed) checked against the
    unbatched greedy answers, mixed with every hostile class; then the server's RSS is within
    300 MB of before and its open file descriptors are back to the baseline."""
    soak = Soak(server.url, server.process.pid, cases, expected)
    report = soak.run(SOAK_SECONDS, clients=16)
    summary = report.summary()
    print(json.dumps(summary, indent=2))
    assert not report.problems, summary
    kinds = summary["requests"]
    assert kinds.get("well-formed", 0) + kinds.get("well-formed stream", 0) >= 100, kinds
    assert {k for k, _ in Soak.HOSTILE} - {"8192 x 8192 PNG", "head never ends"} <= set(kinds), kinds
    assert report.rss_after - report.rss_before < 300 << 20, summary
    assert report.fds_after <= report.fds_before, summary
    assert threading.active_count() < 50
