"""Knorm: keys with a small L2 norm tend to draw attention, so keep the lowest-norm keys."""

from __future__ import annotations

import torch

from policies import Candidates, Policy, register


@register("knorm")
class KeyNorm(Policy):
    def score(self, candidates: Candidates) -> torch.Tensor:
        return -candidates.keys.float().norm(dim=-1)
