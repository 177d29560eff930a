"""MiKV (Yang et al., "No Token Left Behind", arXiv 2402.18096): demote instead of evict.

Any scorer ranks the tokens (H2O's accumulated attention by default, as the paper). The best ``high``
share of the budget stays at full precision; the rest of the budget is held at ``bits`` bits
(per-token asymmetric round-to-nearest, keys balanced per channel: ``engine.kv_quant``) instead of
being dropped; only tokens beyond the budget are evicted. A demoted token never moves back up: when a
low-precision token ranks among the best again, it keeps its place in the budget at low precision
and the full-precision share goes to the best tokens still held at full precision.

The memory then has two tiers (``engine.cache``), and its bytes are what they hold: at 4 bits and
``high=0.25`` a float32 model's budget costs about a third of the bytes of the same tokens at full
precision, so ``--memory-bytes`` holds about three times the tokens.

Parameters: ``scorer`` (default ``h2o``), ``high`` (0.25, the share of the budget kept at full
precision), ``bits`` (4; 2, 3, 4 or 8).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.kv_quant import check_bits
from policies import Candidates, Policy, PolicyError, Selection, Wrapper, keep_counts, register


@register("mikv")
@dataclass
class MiKV(Wrapper):
    scorer: Policy | str = "h2o"
    high: float = 0.25
    bits: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.high <= 1:
            raise PolicyError(f"mikv high must be within 0..1 (the full-precision share), got {self.high!r}")
        try:
            check_bits(self.bits, "mikv bits")
        except ValueError as error:
            raise PolicyError(str(error)) from None

    @property
    def low_bits(self) -> int:  # type: ignore[override]
        return self.bits

    @property
    def high_share(self) -> float:  # type: ignore[override]
        return self.high

    def select(self, candidates: Candidates, budget: int) -> Selection:
        scores = self.score(candidates)
        counts = torch.full(scores.shape[:2], budget, device=scores.device)
        keep = keep_counts(candidates, scores, counts)
        already_low = candidates.low if candidates.low is not None else torch.zeros_like(keep)
        full_precision = keep_counts(
            candidates, scores.masked_fill(~keep | already_low, float("-inf")), (counts * self.high).long()
        )
        full_precision &= keep & ~already_low
        return Selection(keep, low=keep & ~full_precision)
