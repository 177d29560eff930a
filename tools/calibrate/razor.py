"""RazorAttention's head scores: echo and induction on repeated random tokens (Tang et al., 2024).

The prompt is a BOS token, then ``--razor-length`` random token ids repeated four times (the paper:
2500 ids from 10000..12500; shorter here when the model's positions end before 10001). With full
attention, every query in the second and later copies is looked at against each earlier copy of its
own token at j: *echo* is the probability it puts on j (the same token, earlier), *induction* the
probability on j + 1 (the token that followed it). Scores are averaged over all such pairs, post-RoPE
and causal as attention is; a KV head takes the highest of its query heads.
"""

from __future__ import annotations

import argparse

import torch

from engine.llm import LLM
from engine.prefill import PrefillConfig
from tools.calibrate import per_kv_head, rotated

NAME = "razor"
REPEATS = 4
PAPER_LENGTH = 2500
ROWS = 256  # query rows scored at once


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--razor-length", type=int,
        help=f"random tokens per copy (default: {PAPER_LENGTH}, or what the model's positions allow)",
    )  # fmt: skip


def units(args: argparse.Namespace) -> int:
    return 1


def calibrate(llm: LLM, args: argparse.Namespace, advance) -> dict:
    config = llm.config
    length = args.razor_length or min(PAPER_LENGTH, (config.max_position_embeddings - 1) // REPEATS)
    ids = repeated_ids(llm, length, args.seed)
    induction = torch.zeros(config.num_layers, config.num_heads)
    echo = torch.zeros_like(induction)

    def tap(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        echo[layer], induction[layer] = copy_scores(rotated(llm, q[0]), rotated(llm, k[0]), length)

    llm.prefill(ids, PrefillConfig(), tap=tap)
    advance()
    return {
        "induction": per_kv_head(llm, induction, "max").tolist(),
        "echo": per_kv_head(llm, echo, "max").tolist(),
        "query_heads": {"induction": induction.tolist(), "echo": echo.tolist()},
        "length": length,
        "repeats": REPEATS,
        "seed": args.seed,
    }


def repeated_ids(llm: LLM, length: int, seed: int) -> list[int]:
    vocab = llm.config.vocab_size
    low, high = (10000, 12500) if vocab > 12500 else (vocab // 4, vocab)
    segment = torch.randint(low, high, (length,), generator=torch.Generator().manual_seed(seed)).tolist()
    bos = llm.config.bos_token_id
    return [bos if bos is not None else segment[0], *segment * REPEATS]


def copy_scores(q: torch.Tensor, k: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Echo and induction scores of each query head, from rotated q [Hq, n, D] and k [Hkv, n, D]
    of the prompt ``repeated_ids`` (token i of copy c sits at 1 + c * length + i)."""
    heads, n, dim = q.shape
    keys = k.repeat_interleave(heads // k.shape[0], dim=0)
    echo, induction, pairs = torch.zeros(heads), torch.zeros(heads), 0
    for rows in torch.arange(1 + length, n).split(ROWS):
        scores = q[:, rows] @ keys.transpose(1, 2) / dim**0.5  # [Hq, rows, n]
        scores = scores.masked_fill(torch.arange(n)[None, None, :] > rows[None, :, None], float("-inf"))
        lse = scores.logsumexp(dim=-1)
        for copy in range(1, REPEATS):
            earlier = rows - copy * length
            present = earlier >= 1
            if not present.any():
                continue
            row_index, before = present.nonzero()[:, 0], earlier[present]
            for column, total in ((before, echo), (before + 1, induction)):
                total += (scores[:, row_index, column] - lse[:, row_index]).exp().sum(dim=-1)
            pairs += int(present.sum())
    return echo / max(pairs, 1), induction / max(pairs, 1)


def summary(section: dict) -> str:
    table = torch.tensor(section["induction"])
    best = table.flatten().topk(min(5, table.numel())).indices.tolist()
    heads = [divmod(index, table.shape[1]) for index in best]
    return "RazorAttention: best induction (layer, KV head) " + ", ".join(
        f"{head} {table[head].item():.3f}" for head in heads
    )
