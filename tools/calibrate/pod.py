"""POD's offline layer similarity (Ma et al., arXiv 2412.02252, "offline inter-layer attention sharing
exploration"): how alike consecutive layers attend to distant tokens, per KV head.

Each text (``--pod-samples`` passages of the local haystack text, ``--length`` tokens) is read with
full attention; in every layer the last ``--pod-queries`` query rows' attention is taken (averaged
over a KV head's group of query heads), restricted to the distant columns (position at least
``initial`` and at least ``recent`` before the row's: ``engine.pod``'s defaults) and renormalised.
The similarity of layers a and b for a KV head is 1 - their Jensen-Shannon divergence (base 2),
averaged over rows and texts. The section stores all pairs, so ``engine.pod.group_layers`` makes the
blocks of any threshold at run time.
"""

from __future__ import annotations

import argparse
import random

import torch

from engine.llm import LLM
from engine.pod import NAME, PodPlan, PodSettings, group_layers, js_similarity
from engine.prefill import PrefillConfig
from tools.calibrate import rotated
from tools.longctx.haystack import passage
from tools.report import ToolError

__all__ = ["NAME", "add_options", "calibrate", "check", "summary", "units"]


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--pod-samples", type=int, default=16, help="texts for POD's similarity (default: %(default)s)"
    )
    parser.add_argument(
        "--pod-queries", type=int, default=64, help="last query rows compared (default: %(default)s)"
    )
    parser.add_argument(
        "--pod-recent", type=int, default=PodSettings.recent,
        help="recent tokens left out as proximal (default: %(default)s, as at run time)",
    )  # fmt: skip


def check(args: argparse.Namespace) -> None:
    least = PodSettings.initial + args.pod_recent + args.pod_queries
    if args.pod_recent < 1 or args.pod_queries < 1 or args.length < least:
        raise ToolError(
            "POD's similarity needs distant tokens: --pod-recent and --pod-queries at least 1, --length "
            f"at least {least} tokens (or a smaller --pod-recent)"
        )


def units(args: argparse.Namespace) -> int:
    return args.pod_samples


def calibrate(llm: LLM, args: argparse.Namespace, advance) -> dict:
    settings = PodSettings(recent=args.pod_recent)
    config = llm.config
    total = torch.zeros(config.num_kv_heads, config.num_layers, config.num_layers, dtype=torch.float64)
    rng = random.Random(args.seed)
    maps: list[torch.Tensor] = []  # this text's, one per layer

    def tap(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        maps.append(distant_attention(llm, q[0], k[0], args.pod_queries, settings))

    for _ in range(args.pod_samples):
        ids = llm.tokenizer.encode_rendered(" ".join(passage("pydoc", rng)(args.length)))[: args.length]
        maps.clear()
        llm.prefill(ids, PrefillConfig(), tap=tap)
        for lower in range(config.num_layers):
            for upper in range(lower + 1, config.num_layers):
                similarity = js_similarity(maps[lower], maps[upper]).mean(dim=-1)  # [Hkv]
                total[:, lower, upper] += similarity.double()
        advance()
    similarity = total / args.pod_samples
    similarity += similarity.transpose(1, 2).clone() + torch.eye(config.num_layers)
    return {
        "similarity": similarity.tolist(),
        "initial": settings.initial,
        "recent": settings.recent,
        "queries": args.pod_queries,
        "samples": args.pod_samples,
        "length": args.length,
        "seed": args.seed,
    }


def distant_attention(
    llm: LLM, q: torch.Tensor, k: torch.Tensor, rows: int, settings: PodSettings
) -> torch.Tensor:
    """The last ``rows`` queries' attention [Hkv, rows, n] from pre-RoPE q [Hq, n, D] and k [Hkv, n, D]
    (a text read from position 0), averaged over each KV head's group, over distant columns only."""
    n, dim = q.shape[1], q.shape[2]
    queries = rotated(llm, q)[:, n - rows :]
    keys = rotated(llm, k).repeat_interleave(q.shape[0] // k.shape[0], dim=0)
    scores = queries @ keys.transpose(1, 2) / dim**0.5  # [Hq, rows, n]
    at = torch.arange(n - rows, n)[:, None]
    column = torch.arange(n)[None, :]
    scores = scores.masked_fill(column > at, float("-inf"))
    attention = scores.softmax(dim=-1)
    distant = (column >= settings.initial) & (at - column >= settings.recent)
    attention = attention * distant
    attention = attention / attention.sum(dim=-1, keepdim=True).clamp_min(1e-30)
    return attention.unflatten(0, (k.shape[0], -1)).mean(dim=1)


def summary(section: dict) -> str:
    shares = []
    for threshold in (0.5, 0.7, 0.9):
        plan = PodPlan(group_layers(section["similarity"], threshold), section["initial"], section["recent"])
        shares.append(f"{plan.shared_fraction:.0%} at {threshold}")
    return f"POD: (layer, KV head) pairs reading a lower layer's distant keys: {', '.join(shares)}"
