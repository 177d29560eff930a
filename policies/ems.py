"""EMS (Li et al., 2024, arXiv 2412.08521): evict-then-merge with a global-local importance score.

Each KV head keeps its ``budget`` most important tokens. Importance is global plus local: the mean
attention a token has drawn from every query so far (as H2O, per query that could see it, so that old
tokens are not favoured for their age) plus the mean it draws from this step's queries. A token that
is not kept is not simply dropped: it folds into the kept entry of its head whose key is most like its
own (cosine similarity of pre-RoPE keys), whose key and value become the count-weighted mean and whose
attention logit is raised by the log of the tokens it stands for. Tokens like no kept key (similarity
below ``similarity``) are dropped, the paper's "zero class".

Parameters: ``similarity`` (0.5). The paper's exact score weights and similarity measure were not
available; this is the reading above, reported as such.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from policies import Candidates, PolicyError, Selection, keep_counts, register
from policies.h2o import HeavyHitters


@register("ems")
@dataclass
class EMS(HeavyHitters):
    similarity: float = 0.5
    merges = True

    def __post_init__(self) -> None:
        if not -1 <= self.similarity <= 1:
            raise PolicyError(f"ems similarity must be a cosine within -1..1, got {self.similarity!r}")

    def score(self, candidates: Candidates) -> torch.Tensor:
        mass, count = candidates.stats
        return super().score(candidates) + mass / count.clamp_min(1).to(mass.dtype)

    def select(self, candidates: Candidates, budget: int) -> Selection:
        scores = candidates.mask(self.score(candidates))
        keep = keep_counts(candidates, scores, torch.full(scores.shape[:2], budget, device=scores.device))
        keys = F.normalize(candidates.keys.float(), dim=-1)
        similarity = (keys @ keys.transpose(-1, -2)).masked_fill(~keep[:, :, None, :], float("-inf"))
        best, target = similarity.max(dim=-1)
        dropped = ~keep if candidates.valid is None else candidates.valid & ~keep
        into = torch.where(dropped & (best >= self.similarity), target, -1)
        return Selection(keep, into)
