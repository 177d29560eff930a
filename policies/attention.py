"""Policies scored by the attention of the current chunk's queries."""

from __future__ import annotations

import torch

from policies import Candidates, Needs, Policy, register


@register("tova")
class Tova(Policy):
    """TOVA: the last query's attention averaged over all the layer's query heads; one shared choice."""

    needs = Needs(queries=1)

    def score(self, candidates: Candidates) -> torch.Tensor:
        mass = candidates.stats.mass
        return mass.mean(dim=1, keepdim=True).expand_as(mass)


@register("attn_mean")
class AttentionMean(Policy):
    """The IMDC code's "tova": mean attention over all the chunk's queries, per KV head, each key's
    mass divided by the number of queries that could see it."""

    needs = Needs(queries="all")

    def score(self, candidates: Candidates) -> torch.Tensor:
        stats = candidates.stats
        return stats.mass / stats.count.clamp_min(1).to(stats.mass.dtype)
