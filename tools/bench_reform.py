"""REFORM's cost: time to first token and peak memory of reading + answering, against its baselines.

    python -m tools.bench_reform --lengths 8192,16384,32768 --memory 1024 --chunk 1024

For each prompt length, on a pass-key document and its question, one run measures:
- ``full``: the document and question in one full-attention prefill, then the first token (only up
  to the model's window);
- ``imdc``: the document read under ``imdc`` and ``--policy`` at M and c, the question prefilled on
  the compressed memory, then the first token;
- ``reform``: REFORM's reading under the same schedule and policy with its early exit, then phase 2
  (embed the question, gather, recompute) and the first token;
- ``reform, all layers``: the same reading without the early exit, to show what the exit saves.
Each row: seconds of reading, of answering, time to first token, the peak resident memory added,
and the ratio of its time to first token to ``imdc``'s.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from engine.cli import run_main
from engine.generate import GREEDY
from engine.llm import LLM
from engine.prefill import PrefillConfig
from engine.reform import Reform, answer, read
from engine.session import ChatSession
from tools.longctx import make_case
from tools.measure import Stopwatch
from tools.report import (
    GIB,
    MIB,
    Table,
    ToolError,
    add_output_options,
    parse_list,
    publish,
    ratio,
    start_report,
    tool_parser,
)
from tools.shapes import add_model_options, describe, load_from_args

TOOL = "bench_reform"
RUNS = ("full", "imdc", "reform", "reform, all layers")


def parser() -> argparse.ArgumentParser:
    p = tool_parser(TOOL, __doc__)
    p.add_argument("--lengths", default="8192,16384,32768", help="prompt tokens (default: %(default)s)")
    p.add_argument("--memory", type=int, default=1024, help="memory budget M (default: %(default)s)")
    p.add_argument("--chunk", type=int, default=1024, help="chunk c (default: %(default)s)")
    p.add_argument("--policy", default="h2o", help="the reading's policy (default: %(default)s)")
    p.add_argument("--gather", type=int, help="REFORM's gathered tokens (default: the window less 1024)")
    add_model_options(p, shapes=False)
    add_output_options(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run_main(lambda: _run(args, argv), debug=args.debug)


def _run(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    lengths = parse_list(args.lengths, int, "--lengths")
    reading = PrefillConfig(schedule="imdc", policy=args.policy, memory=args.memory, chunk=args.chunk)
    reform = Reform(gather=args.gather)
    llm = load_from_args(args)
    if llm.tokenizer is None:
        raise ToolError("the benchmark's documents need a checkpoint with a tokenizer (--model DIR)")
    window = llm.config.max_position_embeddings
    settings = {
        "lengths": lengths,
        "memory": args.memory,
        "chunk": args.chunk,
        "policy": args.policy,
        "gather": reform.gather_size(window),
        "window": window,
        **describe(llm),
    }
    report = start_report(TOOL, argv, llm.device, settings)
    runs = [(length, run) for length in lengths for run in RUNS if run != "full" or length <= window]
    rows = []
    for length, run in tqdm(runs, desc=TOOL, unit="run"):
        case = make_case("passkey", llm.tokenizer, length)
        rows.append({"length": length, "run": run, **_measure(llm, case, run, reading, reform)})
    report["rows"] = rows
    if any(length > window for length in lengths):
        report["notes"].append(f"full attention is not run past the model's {window}-token window")
    publish(report, tables, json_path=args.json, plot_path=args.plot, draw=draw)
    return 0


def _measure(llm: LLM, case, run: str, reading: PrefillConfig, reform: Reform) -> dict[str, Any]:
    question = case.questions[0].text
    if run == "full":
        session = ChatSession(llm, sampling=GREEDY, document=case.document, query_aware=True)
        with Stopwatch(llm.device) as total:
            session.ask(question, max_tokens=1, progress=False)
        return {"read_seconds": 0.0, "answer_seconds": total.timing.seconds, **_totals(total)}
    if run == "imdc":
        session = ChatSession(llm, prefill=reading, sampling=GREEDY, document=case.document)
        with Stopwatch(llm.device) as total:
            with Stopwatch(llm.device) as phase:
                session.read_document(progress=False)
            read_seconds = phase.timing.seconds
            session.ask(question, max_tokens=1, progress=False)
        return {
            "read_seconds": read_seconds,
            "answer_seconds": total.timing.seconds - read_seconds,
            **_totals(total),
        }
    # REFORM, on the same tokens as ChatSession would give it.
    session = ChatSession(
        llm, prefill=PrefillConfig(**_fields(reading), reform=reform), document=case.document
    )
    prefix = session.document_prefix()
    tokenizer = llm.tokenizer
    document = tokenizer.encode_rendered(prefix)
    target = tokenizer.render_chat([{"role": "user", "content": f"{case.document}\n\n{question}"}])
    tail = tokenizer.encode(target[len(prefix) :], add_special=False)
    with Stopwatch(llm.device) as total:
        done = read(llm, document, session.prefill_config, reform, early_exit=run == "reform")
        with Stopwatch(llm.device) as phase:
            result, held, stats = answer(llm, done, tail, tail, reform)
            llm.complete(result, held, sampling=GREEDY, max_tokens=1)
    return {
        "read_seconds": done.seconds,
        "answer_seconds": phase.timing.seconds,
        "read_layers": stats.read_layers,
        "gathered": stats.gathered,
        "embedding_bytes": stats.embedding_bytes,
        **_totals(total),
    }


def _fields(config: PrefillConfig) -> dict[str, Any]:
    return {
        "schedule": config.schedule,
        "policy": config.policy,
        "memory": config.memory,
        "chunk": config.chunk,
    }


def _totals(watch: Stopwatch) -> dict[str, Any]:
    return {
        "ttft_seconds": watch.timing.seconds,
        "peak_bytes": watch.timing.peak_bytes,
        "added_bytes": watch.timing.added_bytes,
    }


def tables(report: dict[str, Any]) -> list[Table]:
    settings, rows = report["settings"], report["rows"]
    baseline = {row["length"]: row for row in rows if row["run"] == "imdc"}
    title = (
        f"Time to first token and memory, reading + answering ({settings['model']}, "
        f"imdc:{settings['policy']} M={settings['memory']} c={settings['chunk']}, "
        f"REFORM gathers {settings['gather']})"
    )
    header = ["L", "run", "read s", "answer s", "TTFT s", "TTFT / imdc", "peak GiB", "run MiB", "layers read"]
    body = [
        [
            row["length"], row["run"], row["read_seconds"], row["answer_seconds"], row["ttft_seconds"],
            ratio(row["ttft_seconds"], baseline.get(row["length"], {}).get("ttft_seconds")),
            row["peak_bytes"] / GIB, row["added_bytes"] / MIB, row.get("read_layers"),
        ]
        for row in rows
    ]  # fmt: skip
    return [Table(title, header, body)]


def draw(pyplot, report: dict[str, Any]):
    rows = report["rows"]
    figure, axis = pyplot.subplots(figsize=(6, 3.5))
    for run in RUNS:
        mine = [row for row in rows if row["run"] == run]
        if mine:
            axis.plot([r["length"] for r in mine], [r["ttft_seconds"] for r in mine], marker="o", label=run)
    axis.set_xlabel("prompt tokens")
    axis.set_ylabel("time to first token, s")
    axis.set_xscale("log", base=2)
    axis.legend()
    figure.suptitle("REFORM: reading + answering")
    return figure


if __name__ == "__main__":
    sys.exit(main())
