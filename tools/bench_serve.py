"""The server under load: throughput and time to first token, and what conversation reuse saves.

    python -m tools.bench_serve --clients 1,4,16 --tokens 32 --document 4096 --config imdc:snapkv:1024

Starts ``python -m engine.serve`` on a free loopback port (greedy, with ``--config``'s prefill, a spec
as the other tools take: ``full`` or SCHEDULE:POLICY:M[:C]) and measures, in one run:
- concurrency: N clients at once, each streaming one answer of ``--tokens`` tokens to a short question
  of its own; time to first token (mean and worst) and generated tokens per second over the run;
- conversation reuse: one conversation over a ``--document``-token document, ``--turns`` questions
  asked one after another, with the server keeping conversation memories (the default) and with
  ``--cache-bytes 0`` (every turn reads the whole conversation again); time to first token per turn
  and the ratio between the two.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from engine.cli import run_main
from engine.prefill import PrefillConfig
from engine.tokenizer import load_tokenizer
from tools.longctx import make_case
from tools.prefill_specs import parse_spec
from tools.report import (
    Table,
    ToolError,
    add_output_options,
    parse_list,
    publish,
    ratio,
    start_report,
    tool_parser,
)

TOOL = "bench_serve"
REPO = Path(__file__).resolve().parents[1]


def parser() -> argparse.ArgumentParser:
    p = tool_parser(TOOL, __doc__)
    p.add_argument("-m", "--model", help="checkpoint directory (default: the default model)")
    p.add_argument("--clients", default="1,4,16", help="concurrent clients (default: %(default)s)")
    p.add_argument("--tokens", type=int, default=32, help="tokens per answer (default: %(default)s)")
    p.add_argument(
        "--document", type=int, default=4096, help="tokens of the multi-turn document (default: %(default)s)"
    )
    p.add_argument("--turns", type=int, default=3, help="questions about the document (default: %(default)s)")
    p.add_argument("--config", default="imdc:snapkv:1024", help="the server's prefill (default: %(default)s)")
    add_output_options(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run_main(lambda: _run(args, argv), debug=args.debug)


class Server:
    """``python -m engine.serve`` in a child process, on a free port."""

    def __init__(self, argv: list[str]) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "engine.serve", "--port", str(self.port), "--temp", "0", *argv]
        self.process = subprocess.Popen(
            command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ToolError(
                    f"the server did not start: {self.process.stderr.read().strip().splitlines()[-1]}"
                )
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        self.model = httpx.get(f"{self.url}/v1/models").json()["data"][0]["id"]

    def stream(self, messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
        """One streamed chat answer: seconds to the first content, in all, tokens and the engine's stats."""
        body = {"model": self.model, "messages": messages, "max_tokens": max_tokens, "stream": True}
        body["stream_options"] = {"include_usage": True}
        started, first, text, stats, produced = time.perf_counter(), None, [], {}, 0
        with httpx.stream("POST", f"{self.url}/v1/chat/completions", json=body, timeout=600) as response:
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                    first = first or time.perf_counter()
                    text.append(chunk["choices"][0]["delta"]["content"])
                stats = chunk.get("x_engine", stats)
                produced = chunk.get("usage", {}).get("completion_tokens", produced)
        ended = time.perf_counter()
        return {
            "ttft": (first or ended) - started,
            "seconds": ended - started,
            "tokens": produced,
            "text": "".join(text),
            "stats": stats,
        }

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=120)


def _run(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    clients = parse_list(args.clients, int, "--clients")
    if min(clients) < 1 or args.tokens < 1 or args.turns < 1:
        raise ToolError("--clients, --tokens and --turns must be at least 1")
    extra = server_flags(parse_spec(args.config).config)
    model = ["-m", args.model] if args.model else []
    settings = {
        "clients": clients,
        "tokens": args.tokens,
        "document": args.document,
        "turns": args.turns,
        "config": args.config,
        "server": extra,
    }
    report = start_report(TOOL, argv, "cpu", settings)
    server = Server([*model, *extra, "--queue", str(max(clients) * 2)])
    try:
        settings["model"] = server.model
        report["concurrency"] = [_concurrent(server, count, args.tokens) for count in clients]
        report["reuse"] = _turns(server, args, reuse=True)
    finally:
        server.stop()
    cold = Server([*model, *extra, "--cache-bytes", "0"])
    try:
        report["no_reuse"] = _turns(cold, args, reuse=False)
    finally:
        cold.stop()
    publish(report, tables, json_path=args.json, plot_path=args.plot, draw=draw)
    return 0


def server_flags(config: PrefillConfig) -> list[str]:
    """The server's command-line flags for a prefill config (a plain one: no plugin options)."""
    if config.schedule == "full":
        return []
    flags = ["--schedule", config.schedule, "--policy", config.policy]
    flags += ["--memory", str(config.memory), "--chunk", str(config.chunk)]
    for key, value in config.policy_args.items():
        flags += ["--policy-arg", f"{key}={value}"]
    return flags


def _concurrent(server: Server, count: int, tokens: int) -> dict[str, Any]:
    questions = [
        [{"role": "user", "content": f"Tell me about the number {n * 7 + 3}."}] for n in range(count)
    ]
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        answers = list(pool.map(lambda messages: server.stream(messages, tokens), questions))
    wall = time.perf_counter() - started
    ttfts = [a["ttft"] for a in answers]
    return {
        "clients": count,
        "wall_seconds": wall,
        "tokens": sum(a["tokens"] for a in answers),
        "tokens_per_second": sum(a["tokens"] for a in answers) / wall,
        "ttft_mean": statistics.mean(ttfts),
        "ttft_max": max(ttfts),
    }


def _turns(server: Server, args: argparse.Namespace, *, reuse: bool) -> list[dict[str, Any]]:
    """One conversation over a long document: turn after turn, each extending the previous."""
    tokenizer = load_tokenizer(_model_dir(args.model))
    case = make_case("niah_single", tokenizer, args.document, turns=args.turns)
    messages: list[dict[str, str]] = []
    turns = []
    for index, question in enumerate(case.questions):
        content = f"{case.document}\n\n{question.text}" if index == 0 else question.text
        messages.append({"role": "user", "content": content})
        answer = server.stream(messages, args.tokens)
        messages.append({"role": "assistant", "content": answer["text"]})
        turns.append({"turn": index + 1, "reuse": reuse, **{k: v for k, v in answer.items() if k != "text"}})
    return turns


def _model_dir(model: str | None) -> Path:
    if model:
        return Path(model)
    from engine.default_model import default_model_dir

    return default_model_dir()


def tables(report: dict[str, Any]) -> list[Table]:
    settings = report["settings"]
    options = settings["config"]
    concurrency = Table(
        f"Concurrent clients, {settings['tokens']} tokens each ({settings.get('model')}, {options})",
        ["clients", "tokens/s", "TTFT mean s", "TTFT worst s", "wall s"],
        [
            [r["clients"], r["tokens_per_second"], r["ttft_mean"], r["ttft_max"], r["wall_seconds"]]
            for r in report["concurrency"]
        ],
    )
    rows = []
    for warm, cold in zip(report["reuse"], report["no_reuse"], strict=True):
        rows.append(
            [
                warm["turn"], warm["ttft"], cold["ttft"], ratio(cold["ttft"], warm["ttft"]),
                warm["stats"].get("reused_tokens"), warm["stats"].get("prefilled_tokens"),
                cold["stats"].get("prefilled_tokens"),
            ]
        )  # fmt: skip
    reuse = Table(
        f"One conversation over a {settings['document']}-token document: time to first token per turn, "
        "with and without conversation reuse",
        [
            "turn",
            "TTFT s, reuse",
            "TTFT s, no reuse",
            "speed-up",
            "tokens reused",
            "tokens read",
            "tokens read, no reuse",
        ],
        rows,
    )
    return [concurrency, reuse]


def draw(pyplot, report: dict[str, Any]):
    figure, (left, right) = pyplot.subplots(1, 2, figsize=(9, 3.4))
    rows = report["concurrency"]
    left.plot([r["clients"] for r in rows], [r["tokens_per_second"] for r in rows], marker="o")
    left.set_xlabel("concurrent clients")
    left.set_ylabel("tokens/s")
    turns = [r["turn"] for r in report["reuse"]]
    right.plot(turns, [r["ttft"] for r in report["reuse"]], marker="o", label="reuse")
    right.plot(turns, [r["ttft"] for r in report["no_reuse"]], marker="o", label="no reuse")
    right.set_xlabel("turn")
    right.set_ylabel("time to first token, s")
    right.legend()
    figure.suptitle("engine.serve")
    return figure


if __name__ == "__main__":
    sys.exit(main())
