"""H2O (heavy hitters): keep the tokens that have drawn the most attention so far.

The mass each token receives from every query of every step is accumulated in the memory, together
with how many queries could see it, and the score is their ratio: a plain sum would favour old tokens
only because more queries have passed them.
"""

from __future__ import annotations

import torch

from policies import Candidates, Needs, Policy, register


@register("h2o")
class HeavyHitters(Policy):
    needs = Needs(queries="all", every_step=True)
    state = ("h2o_mass", "h2o_seen")

    def update(self, candidates: Candidates) -> None:
        stats = candidates.stats
        candidates.state["h2o_mass"] += stats.mass
        candidates.state["h2o_seen"] += stats.count.to(stats.mass.dtype)

    def score(self, candidates: Candidates) -> torch.Tensor:
        return candidates.state["h2o_mass"] / candidates.state["h2o_seen"].clamp_min(1)
