"""python -m engine.serve, against servers the tests start on free loopback ports: the official openai
client, conversation memory reuse and persistence, many clients at once, a full queue, disconnects,
bad input, the API key, a clean shutdown, and the chat page in a real headless browser."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from tiny import write_tiny_checkpoint

openai = pytest.importorskip("openai")

REPO = Path(__file__).resolve().parents[2]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    def __init__(self, *argv: str) -> None:
        self.api_key = argv[argv.index("--api-key") + 1] if "--api-key" in argv else None
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "engine.serve", "--port", str(self.port), "--temp", "0", *argv],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the server exited: {self.process.stderr.read()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    break
            time.sleep(0.2)
        self.model = httpx.get(f"{self.url}/v1/models", headers=self.headers()).json()["data"][0]["id"]

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self, **options):
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, **options)

    def post(self, path: str, body, **options) -> httpx.Response:
        content = body if isinstance(body, (bytes, str)) else json.dumps(body)
        headers = {"Content-Type": "application/json", **options.pop("headers", {})}
        return httpx.post(f"{self.url}{path}", content=content, headers=headers, timeout=120, **options)

    def metrics(self) -> dict:
        return httpx.get(f"{self.url}/metrics").json()

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=60)
        finally:
            self.process.stdout.close()
            self.process.stderr.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("serve") / "ckpt", max_position_embeddings=4096)


@pytest.fixture(scope="module")
def server(tiny):
    running = Server("-m", str(tiny))
    yield running
    running.stop()


def test_default_model_answers_paris_through_the_openai_client():
    server = Server()
    try:
        reply = server.client().chat.completions.create(model=server.model, messages=QUESTION, max_tokens=24)
        assert "Paris" in reply.choices[0].message.content
        assert reply.choices[0].finish_reason == "stop"
    finally:
        server.stop()


def test_chat_and_completion_streaming_and_not_with_usage(server, tiny):
    from engine.tokenizer import load_tokenizer

    client = server.client()
    reply = client.chat.completions.create(model=server.model, messages=QUESTION, max_tokens=6)
    prompt_tokens = len(load_tokenizer(tiny).encode_chat(QUESTION))
    assert reply.usage.prompt_tokens == prompt_tokens and reply.usage.completion_tokens <= 6
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    chunks = list(
        client.chat.completions.create(
            model=server.model,
            messages=QUESTION,
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == reply.choices[0].message.content  # greedy: the same answer
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    text = client.completions.create(model=server.model, prompt="Long context inference", max_tokens=5)
    assert text.usage.completion_tokens <= 5 and isinstance(text.choices[0].text, str)
    pieces = client.completions.create(
        model=server.model, prompt="Long context inference", max_tokens=5, stream=True
    )
    assert "".join(c.choices[0].text for c in pieces) == text.choices[0].text


def test_a_request_extending_a_conversation_reads_only_the_new_tokens(server):
    client = server.client()
    messages = [{"role": "user", "content": "Keys and values are kept in a bounded memory. " * 20}]
    first = client.chat.completions.create(model=server.model, messages=messages, max_tokens=4)
    engine = first.model_extra["x_engine"]
    assert engine["reused_tokens"] == 0 and engine["prefilled_tokens"] == first.usage.prompt_tokens
    messages += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And?"},
    ]
    second = client.chat.completions.create(model=server.model, messages=messages, max_tokens=4)
    reused = second.model_extra["x_engine"]
    assert reused["reused_tokens"] == first.usage.prompt_tokens + first.usage.completion_tokens
    assert reused["prefilled_tokens"] == second.usage.prompt_tokens - reused["reused_tokens"] < 40


def test_conversations_are_saved_and_found_after_a_restart(tiny, tmp_path):
    cache = tmp_path / "conversations"
    argv = [
        "-m",
        str(tiny),
        "--cache-dir",
        str(cache),
        "--policy",
        "streaming",
        "--memory",
        "64",
        "--chunk",
        "64",
    ]
    messages = [{"role": "user", "content": "Keys and values are kept in a bounded memory. " * 30}]
    first_server = Server(*argv)
    try:
        first = first_server.client().chat.completions.create(
            model=first_server.model, messages=messages, max_tokens=4
        )
    finally:
        assert first_server.stop() == 0
    assert len(list(cache.glob("*.safetensors"))) == 1
    messages += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "So?"},
    ]
    second_server = Server(*argv)
    try:
        second = second_server.client().chat.completions.create(
            model=second_server.model, messages=messages, max_tokens=4
        )
        assert (
            second.model_extra["x_engine"]["reused_tokens"]
            == first.usage.prompt_tokens + first.usage.completion_tokens
        )
        assert second.model_extra["x_engine"]["memory_tokens"] <= 64 + 64
    finally:
        second_server.stop()


def test_sixteen_clients_at_once_all_get_their_answers(server):
    questions = [[{"role": "user", "content": f"Question number {n}?"}] for n in range(16)]
    client = server.client(timeout=300)
    expected = {
        n: client.chat.completions.create(model=server.model, messages=q, max_tokens=8)
        .choices[0]
        .message.content
        for n, q in enumerate(questions[:4])
    }

    def ask(n: int) -> str:
        stream = client.chat.completions.create(
            model=server.model, messages=questions[n], max_tokens=8, stream=True
        )
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(16)))
    assert time.monotonic() - started < 120
    assert all(answers[n] == text for n, text in expected.items()) and all(
        isinstance(a, str) for a in answers
    )


def test_a_full_queue_answers_503_and_a_disconnect_frees_its_slot(tiny):
    server = Server("-m", str(tiny), "--queue", "1")
    try:
        body = {"model": server.model, "messages": QUESTION, "max_tokens": 100_000, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as running:
            lines = running.iter_lines()
            next(lines)  # the first token streams: the worker is busy with it
            waiting = concurrent.futures.ThreadPoolExecutor(1).submit(
                server.post, "/v1/chat/completions", {**body, "stream": False, "max_tokens": 2}
            )
            time.sleep(1.0)
            refused = server.post("/v1/chat/completions", {**body, "stream": False, "max_tokens": 2})
            assert refused.status_code == 503 and refused.headers.get("retry-after")
            assert "busy" in refused.json()["error"]["message"]
        # The streaming client went away: its generation stops and the queued request runs.
        assert waiting.result(timeout=60).status_code == 200
        assert server.metrics()["cancelled"] == 1
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"{not json", 400, "not valid JSON"),
        ({"model": "nope", "messages": QUESTION}, 404, "does not exist"),
        ({"model": "MODEL", "messages": QUESTION, "max_tokens": -1}, 400, "max_tokens"),
        (
            {"model": "MODEL", "messages": QUESTION, "prefill": {"policy": "oracle"}},
            400,
            "unknown policy 'oracle'",
        ),
        ({"model": "MODEL", "messages": QUESTION, "logprobs": True}, 400, "logprobs is not supported"),
        ({"model": "MODEL", "messages": []}, 400, "messages"),
        (b"x" * (10 << 20), 413, "over 8 MiB"),
    ],
)
def test_bad_requests_get_a_clear_4xx_and_the_server_keeps_serving(server, body, status, message):
    if isinstance(body, dict):
        body = json.loads(json.dumps(body).replace('"MODEL"', json.dumps(server.model)))
    response = server.post("/v1/chat/completions", body)
    assert response.status_code == status
    error = response.json()["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error"
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}


def test_the_api_key_is_required_when_set(tiny):
    server = Server("-m", str(tiny), "--api-key", "sesame")
    try:
        refused = server.post("/v1/chat/completions", {"model": "any", "messages": QUESTION})
        assert refused.status_code == 401 and "API key" in refused.json()["error"]["message"]
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sesame", max_retries=0)
        models = client.models.list()
        reply = client.chat.completions.create(model=models.data[0].id, messages=QUESTION, max_tokens=2)
        assert reply.choices[0].message.content is not None
    finally:
        server.stop()


def test_sigterm_lets_the_running_answer_finish_then_exits_cleanly(tiny):
    server = Server("-m", str(tiny))
    body = {"model": server.model, "messages": QUESTION, "max_tokens": 300, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=120) as running:
        lines = running.iter_lines()
        next(lines)
        server.process.send_signal(signal.SIGTERM)
        rest = list(lines)
    assert "data: [DONE]" in rest
    assert server.stop() == 0
    assert "Traceback" not in (server.process.stderr.read() if not server.process.stderr.closed else "")


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium")
def test_the_chat_page_streams_an_answer_in_a_real_browser(server, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(
            executable_path=shutil.which("chromium"),
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
            ],
        )
        try:
            page = browser.new_page()
            page.goto(server.url)
            page.wait_for_function("document.getElementById('model').textContent !== 'imdc-engine'")
            page.fill("#max_tokens", "8")
            page.fill("#question", "What is the capital of France?")
            page.click("#send")
            page.wait_for_selector("#stats", timeout=60_000)
            answer = page.inner_text(".assistant")
            assert answer.strip() and not answer.startswith("error")
            assert "reused" in page.inner_text("#stats")
            page.screenshot(path=str(tmp_path / "chat.png"))
            if os.environ.get("SCREENSHOT"):
                page.screenshot(path=os.environ["SCREENSHOT"])
        finally:
            browser.close()
