"""SnapKV and PyramidKV: votes of an observation window of queries, smoothed along the sequence.

score_j = avg_pool(mass_j) / count_j, where mass_j is the attention key j receives from the window's
queries summed over the GQA group, the pooling is a 1-D average with zero padding (``kernel`` wide,
stride 1), and count_j is how many window queries can see key j. With a numeric ``window`` the window's
own tokens (the newest) are always kept, as in SnapKV; ``window="chunk"`` observes with every query
of the chunk and protects nothing, as the IMDC paper's "SnapKV" (its conv pruner) does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from policies import Candidates, Needs, Policy, PolicyError, keep_recent, register


@register("snapkv")
@dataclass
class SnapKV(Policy):
    window: int | str = 32
    kernel: int = 5

    def __post_init__(self) -> None:
        if self.window != "chunk" and not (isinstance(self.window, int) and self.window > 0):
            raise PolicyError(
                f"snapkv window must be a positive number of queries or 'chunk', got {self.window!r}"
            )
        if not (isinstance(self.kernel, int) and self.kernel > 0 and self.kernel % 2 == 1):
            raise PolicyError(f"snapkv kernel must be a positive odd integer, got {self.kernel!r}")

    @property
    def needs(self) -> Needs:  # type: ignore[override]
        return Needs(queries="all" if self.window == "chunk" else self.window)

    def score(self, candidates: Candidates) -> torch.Tensor:
        mass, count = candidates.stats
        batch, heads, size = mass.shape
        pooled = F.avg_pool1d(
            mass.reshape(batch * heads, 1, size), self.kernel, stride=1, padding=self.kernel // 2
        ).reshape(batch, heads, size)
        scores = pooled / count.clamp_min(1).to(pooled.dtype)
        return scores if self.window == "chunk" else keep_recent(scores, self.window)


@register("pyramidkv")
@dataclass
class PyramidKV(SnapKV):
    """SnapKV with budgets decreasing linearly with depth; the mean over layers is the step's budget.

    The lowest layer gets (2 - 1/beta)(B - w) + w tokens and the top layer (B - w)/beta + w, where B is
    the step's budget and w the protected window (0 for ``window="chunk"``).
    """

    beta: float = 20.0

    def layer_budget(self, budget: int, layer: int, num_layers: int) -> int | None:
        window = 0 if self.window == "chunk" else self.window
        if num_layers == 1 or budget <= window:
            return budget
        low = (budget - window) / self.beta
        high = 2 * (budget - window) - low
        exact = [high - index * (high - low) / (num_layers - 1) + window for index in range(num_layers)]
        floors = [math.floor(value + 1e-9) for value in exact]
        # The tokens lost to rounding go to the lowest layers: the mean stays exact and the order decreasing.
        spare = budget * num_layers - sum(floors)
        return floors[layer] + (1 if layer < spare else 0)
