"""Last-chunk perplexity after a compressed prefill: the IMDC paper's Table B, measured here.

    python -m tools.eval_ppl --length 8192 --chunk 1024 --samples 8 \\
        --configs full,fixed:snapkv:1024,im:snapkv:1024,imdc:snapkv:1024

Each sample is L tokens of the Python standard library's own source, files concatenated in sorted
order (every machine has this corpus). A config prefills the first L - n tokens by its schedule and
policy into a memory of at most M tokens; the last n tokens (``--eval-tokens``, default: the chunk)
are then fed against that memory with no further compression, and their perplexity is reported:
how much of what the next tokens need the compressed memory kept. ``full`` keeps everything.
"""

from __future__ import annotations

import argparse
import math
import sys
import sysconfig
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

import schedules
from engine.cli import run_main
from engine.llm import LLM
from engine.prefill import PrefillConfig, run_prefill
from engine.tokenizer import Tokenizer
from tools.prefill_specs import FULL, NamedConfig, add_config_options, configs_from_args
from tools.report import (
    Table,
    ToolError,
    add_output_options,
    publish,
    ratio,
    start_report,
    tool_parser,
)
from tools.shapes import add_model_options, describe, load_from_args

TOOL = "eval_ppl"
# Directories under the standard library that hold no standard library code of its own.
SKIPPED_DIRECTORIES = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
# The IMDC paper's Table B (LLaMA-2-7B, L=32768, last-chunk PPL, github / arxiv sets):
# (policy, C, M) -> schedule -> (github, arxiv).
PAPER_TABLE_B = {
    ("snapkv", 1024, 256): {"fixed": (1.6062, 2.9913), "im": (1.6064, 3.0049), "imdc": (1.6059, 2.9968)},
    ("snapkv", 1024, 512): {"fixed": (1.5662, 2.8793), "im": (1.5660, 2.8782), "imdc": (1.5657, 2.8753)},
    ("snapkv", 1024, 1024): {"fixed": (1.5374, 2.7757), "im": (1.5336, 2.7637), "imdc": (1.5319, 2.7702)},
    ("streaming", 1024, 256): {"fixed": (1.6325, 3.1929), "im": (1.6327, 3.1919), "imdc": (1.6307, 3.1887)},
    ("streaming", 1024, 512): {"fixed": (1.5832, 3.0234), "im": (1.5826, 3.0219), "imdc": (1.5796, 3.0132)},
    ("streaming", 1024, 1024): {"fixed": (1.5421, 2.8562), "im": (1.5418, 2.8547), "imdc": (1.5408, 2.8543)},
    ("streaming", 8192, 2048): {"fixed": (1.855, 4.228), "im": (1.747, 3.310), "imdc": (1.733, 3.215)},
    ("streaming", 8192, 4096): {"fixed": (4.713, 17.62), "im": (1.889, 4.056), "imdc": (1.838, 3.805)},
    ("streaming", 8192, 8192): {"fixed": (43.59, 20.00), "im": (3.912, 7.449), "imdc": (5.942, 10.37)},
}
PAPER_NOTE = (
    "Paper column: Zeng et al. 2024, Table B, the same schedule, policy, M and c on LLaMA-2-7B with "
    "L=32768 over its github / arxiv sets (no_compress: 7.57 / 11.10). Model and data differ from ours: "
    "compare how the schedules rank, not the values. The paper's SnapKV observes with every chunk "
    "query (here: --policy-arg window=chunk)."
)


def stdlib_sources() -> list[Path]:
    """The standard library's own ``.py`` files, sorted by their path inside it."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [
        path
        for path in root.rglob("*.py")
        if not SKIPPED_DIRECTORIES.intersection(path.relative_to(root).parts[:-1])
    ]
    return sorted(files, key=lambda path: path.relative_to(root).as_posix())


def corpus_samples(tokenizer: Tokenizer, length: int, count: int) -> list[list[int]]:
    """``count`` samples of at least ``length`` token ids each: standard library files in sorted
    order, concatenated whole; a sample starts at a file boundary, after the tokenizer's BOS if any."""
    if length < 1 or count < 1:
        raise ToolError(f"need a positive sample length and count, got {length} and {count}")
    start = [tokenizer.bos_id] if tokenizer.add_bos else []
    samples: list[list[int]] = []
    current = list(start)
    for path in stdlib_sources():
        text = path.read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            continue
        current += tokenizer.encode(text, add_special=False)
        if len(current) >= length:
            samples.append(current)
            if len(samples) == count:
                return samples
            current = list(start)
    raise ToolError(
        f"the standard library holds only {len(samples)} samples of {length} tokens; ask for fewer samples"
    )


def last_chunk_nll(llm: LLM, ids: Sequence[int], config: PrefillConfig, eval_tokens: int) -> float:
    """Summed negative log-likelihood of the last ``eval_tokens`` of ``ids`` after prefilling the rest
    into a memory by ``config``."""
    head, tail = list(ids[:-eval_tokens]), list(ids[-eval_tokens:])
    result = llm.prefill(head, config)
    # The tail is fed in one step with no compression, against the memory as the config left it
    # (keys still shared across layers under POD).
    setup = llm.attention_setup(PrefillConfig().build_policy(), config.positions, config.pod_settings())
    tokens = torch.tensor([tail], device=llm.device)
    plan = [schedules.Step(len(tail), None)]
    tail_logits = run_prefill(llm.model, result.memory, tokens, plan, setup, all_logits=True).logits[0]
    # The head's last logits predict the tail's first token; each tail position predicts the next.
    logits = torch.cat((result.logits, tail_logits[:-1])).float()
    return float(F.cross_entropy(logits, tokens[0], reduction="sum"))


def parser() -> argparse.ArgumentParser:
    p = tool_parser(TOOL, __doc__)
    p.add_argument("--length", type=int, default=8192, help="tokens per sample L (default: %(default)s)")
    p.add_argument("--samples", type=int, default=4, help="samples (default: %(default)s)")
    p.add_argument("--eval-tokens", type=int, help="last tokens scored (default: --chunk, else 1024)")
    add_config_options(
        p, default="full,fixed:snapkv:1024,im:snapkv:1024,imdc:snapkv:1024,imdc:streaming:1024"
    )
    add_model_options(p, shapes=False)
    add_output_options(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run_main(lambda: _run(args, argv), debug=args.debug)


def _run(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    configs = configs_from_args(args)
    eval_tokens = args.eval_tokens or args.chunk or 1024
    if not 0 < eval_tokens < args.length:
        raise ToolError(f"--eval-tokens must be between 1 and --length - 1, got {eval_tokens}")
    llm = load_from_args(args)
    samples = [sample[: args.length] for sample in corpus_samples(llm.tokenizer, args.length, args.samples)]
    settings = {
        "length": args.length,
        "samples": args.samples,
        "eval_tokens": eval_tokens,
        "configs": [named.label for named in configs],
        **describe(llm),
    }
    report = start_report(TOOL, argv, llm.device, settings)
    nll: dict[str, list[float]] = {named.label: [] for named in configs}
    with tqdm(total=len(samples) * len(configs), desc=TOOL, unit="run") as bar:
        for sample in samples:
            for named in configs:
                nll[named.label].append(last_chunk_nll(llm, sample, named.config, eval_tokens))
                bar.update()
    report["rows"] = [_row(named, nll[named.label], eval_tokens) for named in configs]
    full = next((row["ppl"] for row in report["rows"] if row["config"] == FULL), None)
    for row in report["rows"]:
        row["ppl_vs_full"] = ratio(row["ppl"], full)
    if any(row["paper"] for row in report["rows"]):
        report["notes"].append(PAPER_NOTE)
    publish(report, tables, json_path=args.json, plot_path=args.plot, draw=draw)
    return 0


def _row(named: NamedConfig, sums: list[float], eval_tokens: int) -> dict[str, Any]:
    config = named.config
    cell = PAPER_TABLE_B.get((config.policy, config.chunk, config.memory), {}).get(config.schedule)
    return {
        "config": named.label,
        "schedule": config.schedule,
        "policy": config.policy,
        "memory": config.memory if named.bounded else None,
        "chunk": config.chunk if named.bounded else None,
        "ppl": math.exp(sum(sums) / (len(sums) * eval_tokens)),
        "sample_ppl": [math.exp(total / eval_tokens) for total in sums],
        "paper": None if cell is None else {"github": cell[0], "arxiv": cell[1]},
    }


def tables(report: dict[str, Any]) -> list[Table]:
    settings = report["settings"]
    rows = [
        [
            row["config"],
            f"{row['ppl']:.4f}",
            None if row["ppl_vs_full"] is None else f"{row['ppl_vs_full']:.4f}",
            f"{min(row['sample_ppl']):.4f}",
            f"{max(row['sample_ppl']):.4f}",
            None if row["paper"] is None else f"{row['paper']['github']} / {row['paper']['arxiv']}",
        ]
        for row in report["rows"]
    ]
    title = (
        f"Perplexity of the last {settings['eval_tokens']} of L={settings['length']} tokens, "
        f"{settings['samples']} samples of Python standard library source, {settings['model']}"
    )
    header = ["config", "PPL", "PPL / full", "best sample", "worst sample", "paper PPL github / arxiv"]
    return [Table(title, header, rows)]


def draw(pyplot, report: dict[str, Any]):
    rows = report["rows"]
    figure, axis = pyplot.subplots(figsize=(7, 0.45 * len(rows) + 1.2))
    labels = [row["config"] for row in rows]
    bars = axis.barh(labels, [row["ppl"] for row in rows])
    axis.bar_label(bars, labels=[f"{row['ppl']:.3f}" for row in rows], padding=3, fontsize=8)
    axis.invert_yaxis()
    axis.set_xlabel("last-chunk perplexity")
    settings = report["settings"]
    axis.set_title(f"last {settings['eval_tokens']} of {settings['length']} tokens")
    return figure


if __name__ == "__main__":
    sys.exit(main())
