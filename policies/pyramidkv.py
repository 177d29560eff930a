"""PyramidKV (Cai et al., 2024, arXiv 2406.02069): budgets decreasing linearly with depth.

Lower layers attend broadly and keep more; upper layers focus and keep less; the mean over layers is
the step's budget. ``pyramid`` wraps any scorer (``pyramid(h2o)``); ``pyramidkv`` is the paper's
method, SnapKV under this allocation.

The lowest layer gets (2 - 1/beta)(B - w) + w tokens and the top layer (B - w)/beta + w, where B is
the step's budget and w the window the scorer protects (0 when it protects none).

Parameters: ``scorer`` (default ``snapkv``), ``beta`` (20).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from policies import Policy, Wrapper, register
from policies.snapkv import SnapKV


@register("pyramid")
@dataclass
class Pyramid(Wrapper):
    beta: float = 20.0

    def layer_budget(self, budget: int, layer: int, num_layers: int) -> int | None:
        window = getattr(self.scorer, "window", 0)
        window = window if isinstance(window, int) else 0
        if num_layers == 1 or budget <= window:
            return budget
        low = (budget - window) / self.beta
        high = 2 * (budget - window) - low
        exact = [high - index * (high - low) / (num_layers - 1) + window for index in range(num_layers)]
        floors = [math.floor(value + 1e-9) for value in exact]
        # The tokens lost to rounding go to the lowest layers: the mean stays exact and the order decreasing.
        spare = budget * num_layers - sum(floors)
        return floors[layer] + (1 if layer < spare else 0)


@register("pyramidkv")
def pyramidkv(window: int | str = 32, kernel: int = 5, beta: float = 20.0) -> Policy:
    """SnapKV's scores under the pyramid allocation."""
    return Pyramid(SnapKV(window=window, kernel=kernel), beta=beta)
