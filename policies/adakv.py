"""AdaKV (Feng et al., 2024, arXiv 2407.11550): head-wise budgets from one ranking over the layer.

The layer keeps ``budget`` tokens per KV head on average, ``budget x Hkv`` in all. Each head first keeps
its own best ``floor(alpha x budget)`` tokens (the safeguard); the rest of the layer's budget goes to the
best remaining scores of any head. Heads whose attention is spread out keep more, focused heads less,
and the memory holds exactly what each head keeps. As kvpress's ``AdaKVPress(press)``, it wraps any
scorer: ``adakv(h2o)``.

Parameters: ``scorer`` (default ``snapkv``), ``alpha`` (0.2, the safeguard fraction).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from policies import Candidates, PolicyError, Wrapper, register


@register("adakv")
@dataclass
class AdaKV(Wrapper):
    alpha: float = 0.2
    head_wise = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.alpha <= 1:
            raise PolicyError(f"adakv alpha must be within 0..1, got {self.alpha!r}")

    def select(self, candidates: Candidates, budget: int) -> torch.Tensor:
        scores = self.score(candidates)
        batch, heads, size = scores.shape
        floor = min(int(self.alpha * budget), size)
        ranked = scores.clone()
        if floor:
            ranked.scatter_(-1, scores.topk(floor, dim=-1).indices, float("inf"))
            if candidates.valid is not None:  # a head shorter than the floor protects only what it has
                ranked = ranked.masked_fill(~candidates.valid, float("-inf"))
        chosen = ranked.flatten(1).topk(min(budget * heads, heads * size), dim=-1).indices
        keep = torch.zeros(batch, heads * size, dtype=torch.bool, device=scores.device)
        keep = keep.scatter_(-1, chosen, True).view(batch, heads, size)
        return keep if candidates.valid is None else keep & candidates.valid
