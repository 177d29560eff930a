"""REFORM's embedding heads, as the paper selects them (Liu et al., 2025).

Synthetic prompts of two kinds are run with full attention, a pattern-matching task (a key looked up
among distractor keys: ``niah_multikey``) and a multi-hop task (chains of variable assignments:
``vt``). For every head and state (the pre-RoPE query of each query head, key and value of each KV
head) the document's tokens are ranked by their highest cosine similarity to any token of the
question; the head's mean normalised rank (MNR) is the mean rank of the tokens of the facts the
question needs, divided by the document's length (lower is better, 0.5 is chance). The best
``--per-task`` heads of each task are REFORM's embedding heads; the highest of their layers is where
its reading exits.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from engine.llm import LLM
from engine.prefill import PrefillConfig
from tools.calibrate import fact_tokens, prompt, token_at
from tools.longctx import Case, make_case

NAME = "reform"
TASKS = {"pattern": "niah_multikey", "multihop": "vt"}
KINDS = ("q", "k", "v")


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--samples", type=int, default=6, help="REFORM prompts per task (default: %(default)s)"
    )
    parser.add_argument(
        "--per-task", type=int, default=2, help="embedding heads chosen per task (default: %(default)s)"
    )


def units(args: argparse.Namespace) -> int:
    return len(TASKS) * args.samples


def calibrate(llm: LLM, args: argparse.Namespace, advance) -> dict:
    totals: dict[str, dict[str, torch.Tensor] | None] = {kind: None for kind in TASKS}
    for kind in TASKS:
        for sample in range(args.samples):
            case = make_case(TASKS[kind], llm.tokenizer, args.length, seed=args.seed, sample=sample)
            ranks = head_ranks(llm, case)
            previous = totals[kind]
            totals[kind] = ranks if previous is None else {k: previous[k] + ranks[k] for k in KINDS}
            advance()
    mnr = {kind: {k: (table / args.samples).tolist() for k, table in totals[kind].items()} for kind in TASKS}
    heads = choose(mnr, args.per_task)
    return {
        "heads": [list(head) for head in heads],
        "exit_layer": max(layer for layer, _, _ in heads),
        "tasks": TASKS,
        "length": args.length,
        "samples": args.samples,
        "seed": args.seed,
        "mnr": mnr,
    }


def summary(section: dict) -> str:
    heads = [tuple(head) for head in section["heads"]]
    exit_layer = section["exit_layer"]
    lines = [f"REFORM embedding heads (layer, kind, head): {heads}; reading exits after layer {exit_layer}"]
    per_task = len(heads) // len(TASKS)
    for kind, task in section["tasks"].items():
        best = sorted(_flat(section["mnr"][kind]))[: per_task + 2]
        lines.append(f"  {kind} ({task}): best MNR " + ", ".join(f"{v:.3f} at {h}" for v, h in best))
    return "\n".join(lines)


def head_ranks(llm: LLM, case: Case) -> dict[str, torch.Tensor]:
    """MNR of every head and state on one prompt: {"q": [layers, Hq], "k": [layers, Hkv], "v": ...}."""
    question = case.questions[0]
    text, ids = prompt(llm, case)
    question_start = token_at(llm, text, text.rindex(question.text))
    gold = fact_tokens(llm, text, question.facts)
    config = llm.config
    tables = {
        "q": torch.zeros(config.num_layers, config.num_heads),
        "k": torch.zeros(config.num_layers, config.num_kv_heads),
        "v": torch.zeros(config.num_layers, config.num_kv_heads),
    }

    def tap(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        for kind, states in zip(KINDS, (q, k, v), strict=True):
            tables[kind][layer] = normalised_ranks(states[0], question_start, gold)

    llm.prefill(ids, PrefillConfig(), tap=tap)
    return tables


def normalised_ranks(states: torch.Tensor, question_start: int, gold: list[int]) -> torch.Tensor:
    """Per head of ``states`` [H, L, D]: the mean rank of the ``gold`` tokens among the document's
    (those before ``question_start``) by their highest cosine similarity to a question token,
    divided by the document's length."""
    unit = F.normalize(states.float(), dim=-1)
    document, question = unit[:, :question_start], unit[:, question_start:]
    similarity = (document @ question.transpose(1, 2)).amax(dim=-1)  # [H, document]
    golden = similarity[:, gold]  # [H, gold]
    ranks = 1 + (similarity[:, None, :] > golden[:, :, None]).sum(dim=-1)
    return (ranks.float() / question_start).mean(dim=-1)


def choose(mnr: dict[str, dict[str, list[list[float]]]], per_task: int) -> list[tuple[int, str, int]]:
    """The ``per_task`` lowest-MNR (layer, kind, head) of each task, each head once."""
    chosen: list[tuple[int, str, int]] = []
    for kind in TASKS:
        ranked = [head for _, head in sorted(_flat(mnr[kind]))]
        chosen += [head for head in ranked if head not in chosen][:per_task]
    return chosen


def _flat(table: dict[str, list[list[float]]]) -> list[tuple[float, tuple[int, str, int]]]:
    return [
        (value, (layer, kind, head))
        for kind, rows in table.items()
        for layer, row in enumerate(rows)
        for head, value in enumerate(row)
    ]
