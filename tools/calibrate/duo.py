"""DuoAttention's training-free head score, the proxy of NVIDIA kvpress (Xiao et al., 2024).

For each text, each layer's mean pre-RoPE query (per query head) and mean key (per KV head) are taken
over the text's tokens, repeated at positions 0..499 and rotated there; the last position's query
attends to the 500 keys, and the head's score is the mean of the cumulative sum of that attention:
high when the mean query looks far back (its mass sits on early positions), low when it looks at
the recent past. A KV head takes the mean of its query heads, and of all texts. kvpress reads 50
BookSum chapters; here ``--duo-samples`` passages of the local haystack text, ``--duo-length`` tokens each.
"""

from __future__ import annotations

import argparse
import random

import torch

from engine.llm import LLM
from engine.prefill import PrefillConfig
from tools.calibrate import per_kv_head
from tools.longctx.haystack import passage

NAME = "duo"
POSITIONS = 500


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--duo-samples", type=int, default=50, help="texts for the proxy (default: %(default)s)"
    )
    parser.add_argument("--duo-length", type=int, default=1024, help="tokens per text (default: %(default)s)")


def units(args: argparse.Namespace) -> int:
    return args.duo_samples


def calibrate(llm: LLM, args: argparse.Namespace, advance) -> dict:
    config = llm.config
    total = torch.zeros(config.num_layers, config.num_heads)
    rng = random.Random(args.seed)
    for _ in range(args.duo_samples):
        ids = llm.tokenizer.encode_rendered(" ".join(passage("pydoc", rng)(args.duo_length)))
        ids = ids[: args.duo_length]

        def tap(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
            total[layer] += reach(llm, q[0].float().mean(dim=1), k[0].float().mean(dim=1))

        llm.prefill(ids, PrefillConfig(), tap=tap)
        advance()
    scores = total / args.duo_samples
    return {
        "proxy": per_kv_head(llm, scores, "mean").tolist(),
        "samples": args.duo_samples,
        "length": args.duo_length,
        "seed": args.seed,
    }


def reach(llm: LLM, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """How far back each query head's mean query [Hq, D] looks at its KV head's mean key [Hkv, D]:
    the mean of the cumulative attention of the last of ``POSITIONS`` positions [Hq]."""
    positions = torch.arange(POSITIONS)
    heads, dim = query.shape
    queries = llm.rope.rotate(query[:, None, :].expand(heads, POSITIONS, dim), positions)[:, -1]
    keys = llm.rope.rotate(key[:, None, :].expand(key.shape[0], POSITIONS, dim), positions)
    keys = keys.repeat_interleave(heads // key.shape[0], dim=0)  # [Hq, POSITIONS, D]
    attention = ((keys @ queries[:, :, None])[..., 0] / dim**0.5).softmax(dim=-1)
    return attention.cumsum(dim=-1).mean(dim=-1)


def summary(section: dict) -> str:
    table = torch.tensor(section["proxy"])
    return (
        f"DuoAttention proxy: scores {table.min().item():.3f}..{table.max().item():.3f}, "
        f"median {table.median().item():.3f} (the lowest stream)"
    )
