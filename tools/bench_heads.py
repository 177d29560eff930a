"""Memory layouts against the rectangular memory: time, and bytes, at the same budget.

    python -m tools.bench_heads --length 8192 --memory 1024 --chunk 1024 --decode-tokens 64

Each config reads the same random-token prompt chunk by chunk, then generates ``--decode-tokens``
tokens greedily (EOS ignored). The first config is the baseline, a policy that keeps every head
the same length at full precision (the rectangular memory); the others give heads budgets of their
own (``adakv``: the same total, spread unevenly) or roles (``razor``, ``duo``: streaming heads keep a
few hundred tokens, so the memory shrinks), or hold tokens at fewer bits (``mikv``: two tiers,
``kv_bits=4``: all of them). Per config: what the heads hold (mean, shortest, longest, beyond the
sinks), the memory's MiB after the prompt, prefill seconds and decode milliseconds per token (median
of ``--repeat`` runs after a warm-up), and both times as ratios to the baseline's.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import torch
from tqdm import tqdm

from engine.cli import run_main
from engine.generate import GREEDY
from engine.llm import LLM
from tools.measure import Stopwatch, Timing, repeated
from tools.prefill_specs import NamedConfig, add_config_options, configs_from_args, with_options
from tools.report import MIB, Table, ToolError, add_output_options, publish, ratio, start_report, tool_parser
from tools.shapes import add_model_options, describe, load_from_args

TOOL = "bench_heads"
DEFAULT_CONFIGS = "imdc:snapkv:1024,imdc:adakv(snapkv):1024,imdc:razor:1024,imdc:duo:1024"


def parser() -> argparse.ArgumentParser:
    p = tool_parser(TOOL, __doc__)
    p.add_argument("--length", type=int, default=8192, help="prompt tokens (default: %(default)s)")
    p.add_argument("--decode-tokens", type=int, default=64, help="tokens generated (default: %(default)s)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per config (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt (default: %(default)s)")
    add_config_options(p, DEFAULT_CONFIGS)
    add_model_options(p, shapes=False)
    add_output_options(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run_main(lambda: _run(args, argv), debug=args.debug)


def _run(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    if args.length < 1 or args.decode_tokens < 1 or args.repeat < 1:
        raise ToolError("--length, --decode-tokens and --repeat must be at least 1")
    configs = configs_from_args(args)
    llm = load_from_args(args)
    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(llm.config.vocab_size, (args.length,), generator=generator).tolist()
    settings = {
        "length": args.length,
        "decode_tokens": args.decode_tokens,
        "repeat": args.repeat,
        "configs": [named.label for named in configs],
        **describe(llm),
    }
    report = start_report(TOOL, argv, llm.device, settings)
    report["rows"] = [
        {"config": named.label, **_measure(llm, named, ids, args)}
        for named in tqdm(configs, desc=TOOL, unit="config")
    ]
    publish(report, tables, json_path=args.json, plot_path=args.plot, draw=draw)
    return 0


def _measure(llm: LLM, named: NamedConfig, ids: list[int], args: argparse.Namespace) -> dict[str, Any]:
    config = with_options(named, decode_memory=None).config
    held: dict[str, Any] = {}

    def run() -> dict[str, Timing]:
        with Stopwatch(llm.device) as prefill:
            result = llm.prefill(ids, config)
        memory = result.memory
        held.update(_held(memory))
        with Stopwatch(llm.device) as decode:
            llm.complete(
                result, ids, prefill=config, sampling=GREEDY, max_tokens=args.decode_tokens, ignore_eos=True
            )
        return {"prefill": prefill.timing, "decode": decode.timing}

    timings = repeated(run, args.repeat)
    return {
        **held,
        "prefill_seconds": timings["prefill"].seconds,
        "decode_ms_per_token": 1e3 * timings["decode"].seconds / args.decode_tokens,
    }


def _held(memory) -> dict[str, Any]:
    sinks = min(memory.sinks, memory.seen)
    lengths = [length - sinks for layer in memory.layers for length in layer.lengths]
    return {
        "mean_tokens": sum(lengths) / len(lengths),
        "shortest": min(lengths),
        "longest": max(lengths),
        "ragged": not memory.uniform,
        "memory_bytes": memory.nbytes,
    }


def tables(report: dict[str, Any]) -> list[Table]:
    settings, rows = report["settings"], report["rows"]
    base = rows[0]
    title = (
        f"Per-head memory against the rectangular one ({settings['model']}, {settings['length']}-token "
        f"prompt, {settings['decode_tokens']} tokens decoded; ratios to {base['config']})"
    )
    header = [
        "config", "layout", "tokens/head", "shortest", "longest", "memory MiB", "bytes ratio",
        "prefill s", "prefill ratio", "decode ms/tok", "decode ratio",
    ]  # fmt: skip
    body = [
        [
            row["config"], "per-head" if row["ragged"] else "rectangular", row["mean_tokens"],
            row["shortest"], row["longest"], row["memory_bytes"] / MIB,
            ratio(row["memory_bytes"], base["memory_bytes"]),
            row["prefill_seconds"], ratio(row["prefill_seconds"], base["prefill_seconds"]),
            row["decode_ms_per_token"], ratio(row["decode_ms_per_token"], base["decode_ms_per_token"]),
        ]
        for row in rows
    ]  # fmt: skip
    notes = (
        "tokens/head, shortest, longest: entries a KV head holds beyond the sinks after the prompt, over "
        "all layers and heads; memory MiB: the memory's buffers after the prompt.",
    )
    return [Table(title, header, body, notes=notes)]


def draw(pyplot, report: dict[str, Any]):
    rows = report["rows"]
    figure, axes = pyplot.subplots(1, 2, figsize=(8, 3.5))
    labels = [row["config"] for row in rows]
    axes[0].barh(labels, [row["memory_bytes"] / MIB for row in rows])
    axes[0].set_xlabel("memory MiB after the prompt")
    axes[1].barh(labels, [row["decode_ms_per_token"] for row in rows])
    axes[1].set_xlabel("decode ms per token")
    axes[1].set_yticklabels([])
    figure.suptitle("Per-head memory: bytes and decode time")
    figure.tight_layout()
    return figure


if __name__ == "__main__":
    sys.exit(main())
