"""Calibrate a model's heads once, offline, into its calibration file (``engine.calibration``).

    python -m tools.find_heads -m path/to/checkpoint            # writes path/to/checkpoint/calibration.json
    python -m tools.find_heads --output models/calibration/SmolLM2-135M-Instruct.json

REFORM's embedding heads, as the paper selects them: synthetic prompts of two kinds are run with full
attention, a pattern-matching task (a key looked up among distractor keys: ``niah_multikey``) and a
multi-hop task (chains of variable assignments: ``vt``). For every head and state (the pre-RoPE
query of each query head, key and value of each KV head) the document's tokens are ranked by their
highest cosine similarity to any token of the question; the head's mean normalised rank (MNR) is
the mean rank of the tokens of the facts the question needs, divided by the document's length (lower
is better, 0.5 is chance). The best ``--per-task`` heads of each task are REFORM's embedding heads;
the highest of their layers is where its reading exits.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from engine.calibration import CHECKPOINT_FILE, FORMAT, identity
from engine.cli import run_main
from engine.config import read_json_object
from engine.llm import LLM
from engine.prefill import PrefillConfig
from tools.longctx import Case, make_case, prompt_messages
from tools.report import ToolError, tool_parser
from tools.shapes import add_model_options, load_from_args

TOOL = "find_heads"
TASKS = {"pattern": "niah_multikey", "multihop": "vt"}
KINDS = ("q", "k", "v")


def parser() -> argparse.ArgumentParser:
    p = tool_parser(TOOL, __doc__)
    p.add_argument(
        "--length", type=int, default=4096, help="tokens per calibration prompt (default: %(default)s)"
    )
    p.add_argument("--samples", type=int, default=6, help="prompts per task (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts (default: %(default)s)")
    p.add_argument(
        "--per-task", type=int, default=2, help="embedding heads chosen per task (default: %(default)s)"
    )
    p.add_argument("--output", help=f"file to write (default: the checkpoint's {CHECKPOINT_FILE})")
    add_model_options(p, shapes=False)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run_main(lambda: _run(args, argv), debug=args.debug)


def _run(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    if args.samples < 1 or args.per_task < 1 or args.length < 256:
        raise ToolError("--samples and --per-task must be at least 1, --length at least 256 tokens")
    llm = load_from_args(args)
    if llm.tokenizer is None:
        raise ToolError("calibration prompts need a checkpoint with a tokenizer (--model DIR)")
    output = Path(args.output) if args.output else Path(llm.path) / CHECKPOINT_FILE
    jobs = [(kind, sample) for kind in TASKS for sample in range(args.samples)]
    totals = {kind: None for kind in TASKS}
    for kind, sample in tqdm(jobs, desc=TOOL, unit="prompt"):
        case = make_case(TASKS[kind], llm.tokenizer, args.length, seed=args.seed, sample=sample)
        ranks = head_ranks(llm, case)
        totals[kind] = ranks if totals[kind] is None else {k: totals[kind][k] + ranks[k] for k in KINDS}
    mnr = {kind: {k: (table / args.samples).tolist() for k, table in totals[kind].items()} for kind in TASKS}
    heads = choose(mnr, args.per_task)
    data = read_json_object(output, ToolError) or {}  # other methods' sections are kept
    data.update(
        {
            "format": FORMAT,
            "model": identity(llm),
            "reform": {
                "heads": [list(head) for head in heads],
                "exit_layer": max(layer for layer, _, _ in heads),
                "tasks": TASKS,
                "length": args.length,
                "samples": args.samples,
                "seed": args.seed,
                "command": " ".join(
                    ["python -m tools.find_heads", *(sys.argv[1:] if argv is None else argv)]
                ),
                "date": datetime.now().astimezone().isoformat(timespec="seconds"),
                "mnr": mnr,
            },
        }
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    print(
        f"REFORM embedding heads (layer, kind, head): {heads}; "
        f"reading exits after layer {data['reform']['exit_layer']}"
    )
    for kind in TASKS:
        best = sorted(_flat(mnr[kind]))[: args.per_task + 2]
        print(f"  {kind} ({TASKS[kind]}): best MNR " + ", ".join(f"{v:.3f} at {h}" for v, h in best))
    print(f"wrote {output}")
    return 0


def head_ranks(llm: LLM, case: Case) -> dict[str, torch.Tensor]:
    """MNR of every head and state on one prompt: {"q": [layers, Hq], "k": [layers, Hkv], "v": ...}."""
    question = case.questions[0]
    text = llm.tokenizer.render_chat(prompt_messages(case.document, question.text))
    ids = llm.tokenizer.encode_rendered(text)
    question_start = _token_at(llm, text, text.rindex(question.text))
    gold = sorted(
        {
            index
            for fact in question.facts
            for index in range(
                _token_at(llm, text, text.index(fact.strip())),
                _token_at(llm, text, text.index(fact.strip()) + len(fact.strip())),
            )
        }
    )
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


def _token_at(llm: LLM, text: str, offset: int) -> int:
    """The index of the token holding character ``offset`` of the rendered ``text`` (to a token)."""
    return len(llm.tokenizer.encode_rendered(text[:offset]))


if __name__ == "__main__":
    sys.exit(main())
