"""Time to first token and peak memory of each prefill schedule: the IMDC paper's Table A, measured here.

    python -m tools.bench_prefill --length 8192 --memory 1024 --chunk 1024 --policy snapkv
    python -m tools.bench_prefill --shape llama2-7b --length 32768 --memory 256,512,1024 --chunk 1024

Each schedule prefills the same L random token ids (the last logits are the first token). Ratios are
taken between runs of this one invocation: "speed-up" is the other schedule's time over this one's,
"memory" this one's peak over the other's. ``full`` (no chunking) may not fit: it is then reported as
"does not fit", from CUDA's out-of-memory error or, on the CPU, from ``--memory-limit-gib``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import torch
from tqdm import tqdm

import schedules
from engine.cli import run_main
from engine.llm import LLM
from engine.peak_memory import available_bytes
from engine.prefill import PrefillConfig
from tools.measure import DoesNotFit, measure, memory_limit
from tools.prefill_specs import FULL, policy_args_of
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

TOOL = "bench_prefill"
# The IMDC paper's Table A, eager SnapKV block (notes/imdc-paper.md §4): M -> schedule -> (TTFT s, peak GB).
PAPER_TABLE_A = {
    256: {"fixed": (8.153, 24.7), "im": (7.426, 24.6), "imdc": (7.487, 23.2)},
    512: {"fixed": (10.052, 28.4), "im": (8.254, 28.1), "imdc": (8.221, 24.9)},
    1024: {"fixed": (15.074, 37.7), "im": (10.393, 36.7), "imdc": (10.050, 28.9)},
}
PAPER_SETTING = {"shape": "llama2-7b", "length": 32768, "chunk": 1024, "policy": "snapkv"}
PAPER_SOURCE = "paper (A800, eager)"
PAPER_NOTE = (
    "Paper rows: Zeng et al. 2024, Table A (A800-80GB, eager attention with SnapKV-style scores, "
    "LLaMA-2-7B, bf16, L=32768, c=1024; memory in GB as its notebook printed it). They were measured "
    "differently from ours: the paper's eager attention materialises every layer's attention matrix, "
    "we run this engine's attention backend (fused kernels on a GPU) with random weights of the same "
    "shape; its SnapKV observes with every chunk query, as --policy-arg window=chunk does here. "
    "Compare the ratios within each source, not absolute values across sources."
)
CPU_PEAK_NOTE = (
    "On the CPU, peak = the process's peak resident set during the prefill (weights and libraries "
    "included); 'run MiB' = what the prefill added on top of what was resident before it."
)
DEFAULT_CPU_SHARE = 0.9  # of the memory available at start, the default --memory-limit-gib


def parser() -> argparse.ArgumentParser:
    p = tool_parser(TOOL, __doc__)
    p.add_argument(
        "--schedules", default="full,fixed,im,imdc", help="comma-separated schedules (default: %(default)s)"
    )
    p.add_argument("--policy", default="snapkv", help="compression policy (default: %(default)s)")
    p.add_argument(
        "--policy-arg", action="append", default=[], metavar="KEY=VALUE", help="policy option (repeatable)"
    )
    p.add_argument("--length", type=int, default=8192, help="prompt tokens L (default: %(default)s)")
    p.add_argument(
        "--memory",
        default="1024",
        help="memory budget M, or a comma list: a block each (default: %(default)s)",
    )
    p.add_argument("--chunk", type=int, default=1024, help="chunk size c (default: %(default)s)")
    p.add_argument("--repeat", type=int, default=1, help="timed runs after one warm-up; the median counts")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompt ids")
    p.add_argument(
        "--memory-limit-gib",
        type=float,
        help="CPU only: a run may add at most this much memory, else it is reported as 'does not fit' "
        f"(default: {DEFAULT_CPU_SHARE * 100:.0f}%% of the memory available at start; 0: no limit)",
    )
    add_model_options(p, shapes=True)
    add_output_options(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run_main(lambda: _run(args, argv), debug=args.debug)


def _run(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    names = parse_list(args.schedules, str, "--schedules")
    unknown = [name for name in names if name not in schedules.available()]
    if unknown:
        raise ToolError(f"unknown schedule {unknown[0]!r}; known: {', '.join(schedules.available())}")
    memories = parse_list(args.memory, int, "--memory")
    if args.length < 1:
        raise ToolError(f"--length must be a positive number of tokens, got {args.length}")
    policy_args = policy_args_of(args.policy_arg)
    # Plan everything first: a setting a schedule cannot plan fails before the model even loads.
    runs: list[tuple[PrefillConfig, int | None]] = [(PrefillConfig(), None)] if FULL in names else []
    runs += [
        (
            PrefillConfig(
                schedule=name, policy=args.policy, memory=m, chunk=args.chunk, policy_args=policy_args
            ),
            m,
        )
        for m in memories
        for name in names
        if name != FULL
    ]
    plans = [config.plan(args.length) for config, _ in runs]
    llm = load_from_args(args)
    settings = {
        "shape": args.shape if args.model is None else "checkpoint",
        "length": args.length,
        "chunk": args.chunk,
        "memories": memories,
        "schedules": names,
        "policy": args.policy,
        "policy_args": policy_args,
        "repeat": args.repeat,
        "seed": args.seed,
        **describe(llm),
    }
    report = start_report(TOOL, argv, llm.device, settings)
    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(llm.config.vocab_size, (args.length,), generator=generator).tolist()
    limit = _cpu_limit(args.memory_limit_gib) if llm.device.type == "cpu" else None

    rows = [
        _measure(llm, ids, config, memory, plan, args.repeat, limit)
        for (config, memory), plan in zip(tqdm(runs, desc=TOOL, unit="run"), plans, strict=True)
    ]
    _add_ratios(rows)
    report["rows"] = rows
    if llm.device.type == "cpu":
        report["notes"].append(CPU_PEAK_NOTE)
    if limit is not None:
        report["settings"]["cpu_limit_bytes"] = limit
    matched = all(settings.get(key) == value for key, value in PAPER_SETTING.items())
    report["paper"] = paper_rows(memories, names) if matched else []
    if report["paper"]:
        report["notes"].append(PAPER_NOTE)
    publish(report, tables, json_path=args.json, plot_path=args.plot, draw=draw)
    return 0


def _cpu_limit(gib: float | None) -> int | None:
    if gib == 0:
        return None
    if gib is not None:
        if gib < 0:
            raise ToolError(f"--memory-limit-gib must be positive (or 0 for none), got {gib}")
        return int(gib * GIB)
    available = available_bytes(torch.device("cpu"))
    return None if available is None else int(available * DEFAULT_CPU_SHARE)


def _measure(
    llm: LLM,
    ids: list[int],
    config: PrefillConfig,
    memory: int | None,
    plan: list[schedules.Step],
    repeat: int,
    limit: int | None,
) -> dict[str, Any]:
    backend = llm.attention_setup(config.build_policy(), config.positions).backend.name
    row: dict[str, Any] = {
        "schedule": config.schedule,
        "memory": memory,
        "chunk": None if config.schedule == FULL else config.chunk,
        "length": len(ids),
        "steps": len(plan),
        "peak_span": schedules.peak_span(plan),
        "backend": backend,
    }
    try:
        with memory_limit(llm.device, limit):
            timing = measure(lambda: llm.prefill(ids, config), llm.device, repeat)
    except DoesNotFit as error:
        return {**row, "fits": False, "error": str(error)}
    return {
        **row,
        "fits": True,
        "seconds": timing.seconds,
        "peak_bytes": timing.peak_bytes,
        "baseline_bytes": timing.baseline_bytes,
        "added_bytes": timing.added_bytes,
    }


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    """Speed-up (reference time / this time) and memory (this peak / reference peak) against the
    ``fixed`` run with the same M and against ``full``, where those were measured and fit."""
    full = next((row for row in rows if row["schedule"] == FULL and row["fits"]), None)
    for row in rows:
        fixed = next(
            (r for r in rows if r["schedule"] == "fixed" and r["memory"] == row["memory"] and r["fits"]), None
        )
        for name, reference in (("fixed", fixed), ("full", full)):
            fits = row["fits"] and reference is not None
            row[f"speedup_vs_{name}"] = ratio(reference["seconds"], row["seconds"]) if fits else None
            row[f"memory_vs_{name}"] = ratio(row["peak_bytes"], reference["peak_bytes"]) if fits else None


def paper_rows(memories: list[int], names: list[str]) -> list[dict[str, Any]]:
    """The paper's Table A cells for these M and schedules, with their ratios to its FM."""
    rows = []
    for memory in memories:
        cell = PAPER_TABLE_A.get(memory)
        if cell is None:
            continue
        fixed_seconds, fixed_gb = cell["fixed"]
        for name in names:
            if name in cell:
                seconds, gb = cell[name]
                rows.append(
                    {
                        "schedule": name,
                        "memory": memory,
                        "seconds": seconds,
                        "peak_gb": gb,
                        "speedup_vs_fixed": fixed_seconds / seconds,
                        "memory_vs_fixed": gb / fixed_gb,
                    }
                )
    return rows


HEADER = (
    "source", "schedule", "M", "c", "steps", "peak span", "TTFT s", "peak GiB", "run MiB",
    "speed-up vs fixed", "memory vs fixed", "speed-up vs full", "memory vs full",
)  # fmt: skip


def tables(report: dict[str, Any]) -> list[Table]:
    settings = report["settings"]
    rows = []
    for row in report["rows"]:
        measured = row["fits"]
        rows.append(
            [
                "ours",
                row["schedule"],
                row["memory"],
                row["chunk"],
                row["steps"],
                row["peak_span"],
                row["seconds"] if measured else "does not fit",
                row["peak_bytes"] / GIB if measured else None,
                row["added_bytes"] / MIB if measured else None,
                row["speedup_vs_fixed"],
                row["memory_vs_fixed"],
                row["speedup_vs_full"],
                row["memory_vs_full"],
            ]
        )
        paper = next(
            (p for p in report["paper"] if (p["schedule"], p["memory"]) == (row["schedule"], row["memory"])),
            None,
        )
        if paper is not None:
            rows.append(
                [PAPER_SOURCE, paper["schedule"], paper["memory"], settings["chunk"], None, None,
                 paper["seconds"], f"{paper['peak_gb']} GB", None, paper["speedup_vs_fixed"],
                 paper["memory_vs_fixed"], None, None]
            )  # fmt: skip
    machine = report["machine"]
    backends = ", ".join(dict.fromkeys(row["backend"] for row in report["rows"]))
    title = (
        f"Prefill of L={settings['length']} tokens, c={settings['chunk']}, policy {settings['policy']}, "
        f"{settings['model']} ({settings['dtype']}, {machine['gpu'] or machine['device']}, "
        f"attention backend {backends})"
    )
    return [Table(title, HEADER, rows)]


def draw(pyplot, report: dict[str, Any]):
    measured = [row for row in report["rows"] if row["fits"]]
    labels = [row["schedule"] + ("" if row["memory"] is None else f"\nM={row['memory']}") for row in measured]
    figure, (time_axis, memory_axis) = pyplot.subplots(1, 2, figsize=(max(6, 1.3 * len(labels)) * 2, 4))
    palette = {name: f"C{index}" for index, name in enumerate(dict.fromkeys(r["schedule"] for r in measured))}
    colors = [palette[row["schedule"]] for row in measured]
    time_axis.bar(labels, [row["seconds"] for row in measured], color=colors)
    time_axis.set_ylabel("time to first token (s)")
    memory_axis.bar(labels, [row["peak_bytes"] / GIB for row in measured], color=colors)
    memory_axis.set_ylabel("peak memory (GiB)")
    settings = report["settings"]
    figure.suptitle(f"prefill of {settings['length']} tokens, c={settings['chunk']}, {settings['policy']}")
    return figure


if __name__ == "__main__":
    sys.exit(main())
