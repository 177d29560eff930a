"""UNComp (Xiong et al., 2024, arXiv 2410.03090): head budgets from the matrix entropy of the keys.

A head whose keys span many directions (high entropy of the spectrum of their covariance) holds more
distinct information and behaves like a retrieval head; one whose keys are nearly collinear is
redundant and compresses well. At every compression, each KV head's truncated matrix entropy is
measured on its candidates' keys, and the layer's ``budget x Hkv`` tokens are shared out in proportion
to it, each head keeping at least ``alpha x budget``; the scorer picks the tokens within each head.
(UNComp also compresses whole layers' hidden states by entropy; that changes which tokens later layers
see at all and does not map onto a memory read chunk by chunk, so only the KV part is here.)

The entropy of a head: rows of its keys X normalised, S = X^T X / n, eigenvalues l_1 >= l_2 >= ...,
p_i = l_i / sum(l) over the ``rank`` largest, H = -sum p_i log p_i.

Parameters: ``scorer`` (``snapkv``), ``rank`` (32), ``alpha`` (0.2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from policies import Candidates, PolicyError, Wrapper, apportion, keep_counts, register


@register("uncomp")
@dataclass
class UNComp(Wrapper):
    rank: int = 32
    alpha: float = 0.2
    head_wise = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (isinstance(self.rank, int) and self.rank > 0):
            raise PolicyError(f"uncomp rank must be a positive number of eigenvalues, got {self.rank!r}")
        if not 0 <= self.alpha <= 1:
            raise PolicyError(f"uncomp alpha must be within 0..1, got {self.alpha!r}")

    def select(self, candidates: Candidates, budget: int) -> torch.Tensor:
        scores = self.score(candidates)
        entropy = key_entropy(candidates, self.rank)
        sizes = (
            torch.full(entropy.shape, scores.shape[-1])
            if candidates.valid is None
            else candidates.valid.sum(dim=-1).cpu()
        )
        counts = torch.tensor(
            [
                apportion(budget * len(row), row.tolist(), int(self.alpha * budget), capacity.tolist())
                for row, capacity in zip(entropy.cpu(), sizes, strict=True)
            ],
            device=scores.device,
        )
        return keep_counts(candidates, scores, counts)


def key_entropy(candidates: Candidates, rank: int) -> torch.Tensor:
    """The truncated matrix entropy of each head's candidate keys [B, Hkv]."""
    keys = F.normalize(candidates.keys.float(), dim=-1)
    if candidates.valid is not None:
        keys = keys * candidates.valid[..., None]
    count = (
        torch.full(keys.shape[:2], keys.shape[2], device=keys.device)
        if candidates.valid is None
        else candidates.valid.sum(dim=-1).clamp_min(1)
    )
    covariance = keys.transpose(-1, -2) @ keys / count[..., None, None]
    eigenvalues = torch.linalg.eigvalsh(covariance).flip(-1)[..., :rank].clamp_min(0)
    p = eigenvalues / eigenvalues.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    return -(p * p.clamp_min(1e-12).log()).sum(dim=-1)
