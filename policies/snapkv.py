"""SnapKV (Li et al., 2024, arXiv 2404.14469): votes of a window of queries, smoothed along the sequence.

score_j = avg_pool(mass_j) / count_j, where mass_j is the attention key j receives from the window's
queries summed over the GQA group, the pooling is a 1-D average with zero padding (``kernel`` wide,
stride 1), and count_j is how many window queries can see key j. With a numeric ``window`` the window's
own tokens (the newest) are always kept, as in SnapKV; ``window="chunk"`` observes with every query
of the chunk and protects nothing, as the IMDC paper's "SnapKV" (its conv pruner) does.
"""

from __future__ import annotations

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
        return window_votes(mass, count, self.kernel, self.window)


def window_votes(mass: torch.Tensor, count: torch.Tensor, kernel: int, window: int | str) -> torch.Tensor:
    """SnapKV's score from the window's attention mass [B, H, n] and viewer counts: pooled, per viewer,
    the window's own tokens raised to the top (none for ``window="chunk"``)."""
    batch, heads, size = mass.shape
    pooled = F.avg_pool1d(
        mass.reshape(batch * heads, 1, size), kernel, stride=1, padding=kernel // 2
    ).reshape(batch, heads, size)
    scores = pooled / count.clamp_min(1).to(pooled.dtype)
    return scores if window == "chunk" else keep_recent(scores, window)
