"""``python -m engine.serve``: an OpenAI-compatible HTTP API and a web chat over one model.

    python -m engine.serve                              # the default model on http://127.0.0.1:8080
    python -m engine.serve -m DIR --port 8000 --api-key KEY --policy snapkv --memory 1024 \\
        --cache-dir ~/.cache/imdc-engine/conversations

Endpoints (llama-server's where it has them): ``GET /health``, ``GET /v1/models``, ``POST
/v1/chat/completions`` and ``POST /v1/completions`` (streamed as server-sent events ending with
``data: [DONE]`` when ``stream`` is true), ``GET /metrics`` (counters, as JSON) and a chat page at
``/``. Requests take OpenAI's sampling fields, llama-server's ``top_k``, ``min_p`` and
``repeat_penalty``, and a ``prefill`` object with the chat's prefill settings (``schedule``,
``policy``, ``memory`` or ``memory_bytes``, ``chunk``, ``kv_bits``, ``policy_args``, ``reform``...);
every response carries ``x_engine``, the numbers of its prefill and memory.

A request whose messages extend an earlier conversation continues over that conversation's
compressed memory and reads only the new tokens. Conversations are kept in an LRU bounded in bytes
(``--cache-bytes``) and, with ``--cache-dir``, saved there as safetensors and found again after a
restart. One worker runs the model; requests wait in a bounded queue (503 with Retry-After when it
is full); a client that disconnects cancels its generation; Ctrl-C or SIGTERM lets running requests
finish, then exits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import queue
import signal
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.attention import PrefillCancelled
from engine.calibration import fingerprint
from engine.cli import Parser, run_main
from engine.conversations import Conversation, ConversationCache, config_key
from engine.generate import Sampling
from engine.llm import LLM, Completion
from engine.options import (
    add_model_options,
    add_prefill_options,
    add_sampling_options,
    build_prefill,
    load_model,
    prefill_config,
    sampling,
)
from engine.prefill import PrefillConfig

WEB_PAGE = Path(__file__).resolve().parent / "web" / "chat.html"
MAX_BODY_BYTES = 8 << 20
FINISH = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "stop"}
PREFILL_NAMES = {
    "memory": "prefill.memory",
    "memory_bytes": "prefill.memory_bytes",
    "chunk": "prefill.chunk",
    "policy": "prefill.policy",
    "schedule": "prefill.schedule",
}


class ServeError(Exception):
    """A request the server refuses: an HTTP status and an OpenAI-style error."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None, headers=None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_response(
    status: int, message: str, *, param: str | None = None, code: str | None = None, headers=None
):
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


# Request bodies: everything a client may send is declared; anything else is a clear 400.


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PrefillSettings(Strict):
    schedule: str | None = None
    policy: str | None = None
    memory: int | None = None
    chunk: int | None = None
    sinks: int | None = None
    positions: str | None = None
    decode_memory: int | None = None
    policy_args: dict[str, Any] = Field(default_factory=dict)
    schedule_args: dict[str, Any] = Field(default_factory=dict)
    reform: dict[str, Any] | None = None
    kv_bits: int | None = None
    memory_bytes: int | None = None


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class StreamOptions(Strict):
    include_usage: bool = False


class Sampled(Strict):
    """The sampling fields of OpenAI's API and llama-server's extras."""

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repeat_penalty: float | None = Field(default=None, gt=0.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=1)
    user: str | None = None
    prefill: PrefillSettings | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or not all(stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops


class ChatRequest(Sampled):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class CompletionRequest(Sampled):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str:
        if isinstance(value, list):
            if len(value) != 1:
                raise ValueError("one prompt per request")
            value = value[0]
        if not value:
            raise ValueError("the prompt is empty")
        return value


# The work: one worker thread runs the model, one request at a time.


@dataclass
class Job:
    chat: bool
    text: str  # the rendered prompt (chat) or the prompt itself (completion)
    prefill: PrefillConfig
    sampling: Sampling
    max_tokens: int | None
    stop: list[str]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)

    def emit(self, kind: str, value: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


@dataclass
class Counters:
    requests: int = 0
    completed: int = 0
    cancelled: int = 0
    rejected: int = 0
    prefilled_tokens: int = 0
    reused_tokens: int = 0
    generated_tokens: int = 0


class Worker:
    """Takes jobs from a bounded queue and runs them on the model, continuing kept conversations."""

    def __init__(self, llm: LLM, cache: ConversationCache, size: int) -> None:
        self.llm, self.cache = llm, cache
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=size)
        self.counters = Counters()
        self.thread = threading.Thread(target=self._run, name="engine-worker", daemon=True)

    def submit(self, job: Job) -> None:
        """Queue ``job``; ``queue.Full`` when the queue is full."""
        self.jobs.put_nowait(job)
        self.counters.requests += 1

    def stop(self) -> None:
        while True:  # jobs still waiting are cancelled: their clients get no answer
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.emit("error", ServeError(503, "the server is shutting down"))
        self.jobs.put(None)
        self.thread.join(timeout=60)

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            if job.cancel.is_set():
                self.counters.cancelled += 1
                continue
            try:
                self._answer(job)
            except PrefillCancelled:
                self.counters.cancelled += 1
                job.emit("cancelled", None)
            except ValueError as error:
                job.emit("error", ServeError(400, str(error)))
            except Exception as error:  # one failed request must not stop the server
                job.emit("error", ServeError(500, f"{type(error).__name__}: {error}"))

    def _answer(self, job: Job) -> None:
        llm, tokenizer, prefill = self.llm, self.llm.tokenizer, job.prefill
        settings = config_key(prefill)
        reusable = job.prefill.reform is None
        kept = self.cache.take(job.text, settings, lambda: llm.new_memory(prefill)) if reusable else None
        new_text = job.text[len(kept.text) :] if kept else job.text
        if kept is not None:
            ids = tokenizer.encode(new_text, add_special=False)
            held, memory = kept.ids, kept.memory
        else:
            ids = tokenizer.encode_rendered(job.text) if job.chat else tokenizer.encode(job.text)
            held, memory = [], None
        options = {
            "sampling": job.sampling, "max_tokens": job.max_tokens, "stop": job.stop,
            "on_text": lambda piece: job.emit("text", piece), "cancel": job.cancel,
        }  # fmt: skip
        try:
            if job.prefill.reform is not None:
                completion = llm.generate(ids, prefill=job.prefill, **options)
            else:
                result = llm.prefill(ids, job.prefill, memory=memory, cancel=job.cancel)
                completion = llm.complete(result, held + ids, prefill=job.prefill, **options)
        except PrefillCancelled:
            if kept is not None:
                self.cache.put(kept)  # put back as it was
            raise
        if reusable:
            answer = tokenizer.decode(completion.token_ids, skip_special=False)
            memory_ids = held + ids + completion.token_ids
            self.cache.put(Conversation(job.text + answer, memory_ids, completion.memory, settings))
        if completion.finish_reason == "cancelled":
            self.counters.cancelled += 1
        else:
            self.counters.completed += 1
        self.counters.prefilled_tokens += len(ids)
        self.counters.reused_tokens += len(held)
        self.counters.generated_tokens += len(completion.token_ids)
        job.emit("done", (completion, len(held)))


# The HTTP side.


class BodyLimit:
    """Refuses request bodies over ``limit`` bytes (413), whether or not they declare their length."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", [])).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(scope, receive, send)
        received = 0

        async def limited():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise ServeError(413, self._message(), code="body_too_large")
            return message

        await self.app(scope, limited, send)

    def _message(self) -> str:
        return f"the request body is over {self.limit >> 20} MiB"

    async def _refuse(self, scope, receive, send):
        await error_response(413, self._message(), code="body_too_large")(scope, receive, send)


@dataclass(frozen=True)
class ServerDefaults:
    prefill: PrefillConfig
    sampling: Sampling
    max_tokens: int | None  # None: until the end-of-sequence token
    api_key: str | None


def create_app(
    llm: LLM, defaults: ServerDefaults, cache: ConversationCache, *, queue_size: int = 64
) -> FastAPI:
    model_id = llm.path.name
    worker = Worker(llm, cache, queue_size)
    created = int(time.time())

    async def lifespan(app: FastAPI):
        worker.thread.start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, worker.stop)

    app = FastAPI(title="imdc-engine", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.worker = worker

    @app.middleware("http")
    async def guard(request: Request, call_next):
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > MAX_BODY_BYTES:
            return error_response(
                413, f"the request body is over {MAX_BODY_BYTES >> 20} MiB", code="body_too_large"
            )
        if request.url.path.startswith("/v1/") and defaults.api_key is not None:
            given = request.headers.get("authorization", "")
            if given != f"Bearer {defaults.api_key}":
                return error_response(
                    401, "a valid API key is needed: Authorization: Bearer KEY", code="invalid_api_key"
                )
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError):
        first = error.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
        if first.get("type") == "json_invalid":
            return error_response(400, f"the body is not valid JSON: {first.get('msg')}")
        if first.get("type") == "extra_forbidden":
            return error_response(400, f"{where} is not supported by this server", param=where)
        return error_response(400, f"{where or 'body'}: {first.get('msg')}", param=where or None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        return error_response(error.status_code, str(error.detail))

    @app.exception_handler(ServeError)
    async def refused(request: Request, error: ServeError):
        return error_response(
            error.status, error.message, param=error.param, code=error.code, headers=error.headers
        )

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        counters = worker.counters
        return {
            **vars(counters),
            "queued": worker.jobs.qsize(),
            "conversations": len(cache),
            "conversation_bytes": cache.nbytes,
        }

    @app.get("/v1/models")
    async def list_models():
        return {
            "object": "list",
            "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "imdc-engine"}],
        }

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(WEB_PAGE.read_text(encoding="utf-8"))

    def job_for(body: Sampled, chat: bool, text: str, max_tokens: int | None) -> Job:
        if body.model != model_id:
            raise ServeError(
                404,
                f"the model {body.model!r} does not exist; this server serves {model_id!r}",
                param="model",
                code="model_not_found",
            )
        return Job(
            chat=chat,
            text=text,
            prefill=request_prefill(body.prefill, defaults.prefill),
            sampling=request_sampling(body, defaults.sampling),
            max_tokens=max_tokens if max_tokens is not None else defaults.max_tokens,
            stop=body.stop or [],
            loop=asyncio.get_running_loop(),
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        messages = [{"role": m.role, "content": m.text} for m in body.messages]
        try:
            text = llm.tokenizer.render_chat(messages, add_generation_prompt=True)
        except ValueError as error:
            raise ServeError(400, str(error), param="messages") from None
        job = job_for(body, True, text, body.max_completion_tokens or body.max_tokens)
        return await respond(job, body, request, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        job = job_for(body, False, body.prompt, body.max_tokens)
        return await respond(job, body, request, chat=False)

    async def respond(job: Job, body: Sampled, request: Request, *, chat: bool):
        try:
            worker.submit(job)
        except queue.Full:
            worker.counters.rejected += 1
            busy = "the server is busy: too many requests are waiting; retry shortly"
            raise ServeError(503, busy, headers={"Retry-After": "1"}) from None
        answer = Answer(job, model_id, chat)
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(answer.stream(usage), media_type="text/event-stream")
        return await answer.whole(request)

    return app


def request_prefill(settings: PrefillSettings | None, default: PrefillConfig) -> PrefillConfig:
    if settings is None:
        return default
    given = settings.model_dump(exclude_unset=True)
    if not given:
        return default
    try:
        return build_prefill(names=PREFILL_NAMES, **given)
    except (ValueError, TypeError) as error:
        raise ServeError(400, f"prefill: {error}", param="prefill") from None


def request_sampling(body: Sampled, default: Sampling) -> Sampling:
    given = {
        "temperature": body.temperature, "top_p": body.top_p, "top_k": body.top_k, "min_p": body.min_p,
        "repeat_penalty": body.repeat_penalty, "presence_penalty": body.presence_penalty,
        "frequency_penalty": body.frequency_penalty, "seed": body.seed,
    }  # fmt: skip
    try:
        return replace(default, **{key: value for key, value in given.items() if value is not None})
    except ValueError as error:
        raise ServeError(400, str(error)) from None


class Answer:
    """Turns a job's events into an OpenAI response, whole or streamed."""

    def __init__(self, job: Job, model: str, chat: bool) -> None:
        self.job, self.model, self.chat = job, model, chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    async def whole(self, request: Request) -> JSONResponse:
        text = []
        while True:
            try:
                kind, value = await asyncio.wait_for(self.job.events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    self.job.cancel.set()
                    return error_response(499, "the client went away")
                continue
            if kind == "text":
                text.append(value)
            elif kind == "error":
                return error_response(value.status, value.message, param=value.param, code=value.code)
            elif kind == "cancelled":
                return error_response(499, "cancelled")
            else:
                completion, reused = value
                choice = {"index": 0, "finish_reason": FINISH[completion.finish_reason], "logprobs": None}
                if self.chat:
                    choice["message"] = {"role": "assistant", "content": "".join(text)}
                else:
                    choice["text"] = "".join(text)
                return JSONResponse(
                    {
                        "id": self.id,
                        "object": "chat.completion" if self.chat else "text_completion",
                        "created": self.created,
                        "model": self.model,
                        "choices": [choice],
                        "usage": usage(completion),
                        "x_engine": engine_stats(completion, reused),
                    }
                )

    async def stream(self, include_usage: bool) -> AsyncIterator[str]:
        try:
            if self.chat:
                yield self._chunk({"role": "assistant", "content": ""}, None)
            while True:
                kind, value = await self.job.events.get()
                if kind == "text":
                    yield self._chunk({"content": value} if self.chat else value, None)
                elif kind in ("error", "cancelled"):
                    message = value.message if kind == "error" else "cancelled"
                    yield f"data: {json.dumps({'error': {'message': message, 'type': 'server_error'}})}\n\n"
                    break
                else:
                    completion, reused = value
                    last = self._chunk(
                        {} if self.chat else "",
                        FINISH[completion.finish_reason],
                        reused=reused,
                        completion=completion,
                    )
                    yield last
                    if include_usage:
                        yield self._data({**self._head(), "choices": [], "usage": usage(completion)})
                    break
            yield "data: [DONE]\n\n"
        finally:  # the client went away (or the answer ended): nothing more is wanted
            self.job.cancel.set()

    def _head(self) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def _chunk(
        self, delta, finish: str | None, *, reused: int = 0, completion: Completion | None = None
    ) -> str:
        choice = {"index": 0, "finish_reason": finish, "logprobs": None}
        choice["delta" if self.chat else "text"] = delta
        payload = {**self._head(), "choices": [choice]}
        if completion is not None:
            payload["x_engine"] = engine_stats(completion, reused)
        return self._data(payload)

    @staticmethod
    def _data(payload: dict[str, Any]) -> str:
        return f"data: {json.dumps(payload)}\n\n"


def usage(completion: Completion) -> dict[str, int]:
    produced = len(completion.token_ids)
    return {
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": produced,
        "total_tokens": completion.prompt_tokens + produced,
    }


def engine_stats(completion: Completion, reused: int) -> dict[str, Any]:
    memory = completion.memory
    stats = {
        "reused_tokens": reused,
        "prefilled_tokens": sum(step.chunk for step in completion.prefill.steps),
        "prefill_seconds": completion.prefill.seconds,
        "decode_seconds": completion.decode_seconds,
        "memory_tokens": memory.kept(),
        "memory_bytes": memory.nbytes,
    }
    if completion.reform is not None:
        stats["reform_gathered"] = completion.reform.gathered
    return stats


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m engine.serve", description=__doc__.split("\n\n")[0])
    add_model_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8080, help="port (default: %(default)s)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 requests")
    p.add_argument(
        "-n", "--predict", type=int, default=-1, help="default max_tokens (negative: until end of sequence)"
    )
    p.add_argument(
        "--queue", type=int, default=64, help="requests that may wait; more get 503 (default %(default)s)"
    )
    p.add_argument(
        "--cache-bytes",
        type=int,
        default=1 << 30,
        help="bytes of conversation memory kept in RAM (default 1 GiB)",
    )
    p.add_argument("--cache-dir", help="save conversations here and find them again after a restart")
    add_sampling_options(p)
    add_prefill_options(p)
    return p


def run(args: argparse.Namespace) -> int:
    if args.queue < 1 or args.cache_bytes < 0 or not 0 <= args.port < 65536:
        raise ValueError("--queue must be at least 1, --cache-bytes at least 0, --port within 0..65535")
    defaults = ServerDefaults(
        prefill=prefill_config(args),
        sampling=sampling(args),
        max_tokens=None if args.predict < 0 else args.predict,
        api_key=args.api_key,
    )
    print(f"loading {args.model or 'the default model'} ...", file=sys.stderr)
    llm = load_model(args)
    folder = Path(args.cache_dir).expanduser() if args.cache_dir else None
    cache = ConversationCache(args.cache_bytes, folder, fingerprint(llm.model))
    app = create_app(llm, defaults, cache, queue_size=args.queue)
    print(f"serving {llm.path.name} on http://{args.host}:{args.port} (Ctrl-C to stop)", file=sys.stderr)
    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=30
    )
    GracefulServer(config).run()
    print("stopped", file=sys.stderr)
    return 0


class GracefulServer(uvicorn.Server):
    """uvicorn's server, stopping on Ctrl-C or SIGTERM once the running requests are answered, then
    simply returning: uvicorn itself raises the signal again afterwards, ending the process by it."""

    def handle_exit(self, sig: int, frame: object) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl-C: stop waiting for the running requests
        self.should_exit = True


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run_main(lambda: run(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
