"""Heads with roles: retrieval heads keep what their scorer ranks best, streaming heads keep the
start of the text and the recent past (RazorAttention, DuoAttention).

A streaming head keeps the candidates at original positions below ``sink`` and its ``recent`` newest;
with ``compensate`` the tokens it drops are folded into one entry right after those, the mean of their
keys and values standing for all of them (its attention logit raised by the log of their count).
A retrieval head keeps the scorer's best ``budget``. The memory holds exactly that: a streaming head
costs sink + recent (+ 1) entries, whatever the budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from policies import Candidates, ModelFacts, PolicyError, Selection, Wrapper, keep_counts


@dataclass
class HeadRoles(Wrapper):
    sink: int = 0
    recent: int = 256
    head_wise = True
    compensate = False  # fold what a streaming head drops into one entry
    retrieval: torch.Tensor | None = field(default=None, init=False, repr=False)  # [layers, Hkv] bool

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("sink", "recent"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 0):
                raise PolicyError(f"{type(self).__name__.lower()} {name} must be a whole number >= 0")

    def roles(self, model: ModelFacts) -> torch.Tensor:
        """Which KV heads of each layer are retrieval heads [layers, Hkv] bool."""
        raise NotImplementedError

    def prepare(self, model: ModelFacts) -> None:
        super().prepare(model)
        self.retrieval = self.roles(model)

    def select(self, candidates: Candidates, budget: int) -> Selection:
        if self.retrieval is None:
            raise PolicyError(f"{type(self).__name__} was not prepared for a model")
        scores = self.score(candidates)
        batch, heads, size = scores.shape
        valid = (
            candidates.valid
            if candidates.valid is not None
            else torch.ones(batch, heads, size, dtype=torch.bool, device=scores.device)
        )
        real = valid.sum(dim=-1)  # entries per head
        keep = keep_counts(candidates, scores, real.clamp_max(budget))
        streaming = ~self.retrieval[candidates.layer].to(scores.device)  # [Hkv]
        if not streaming.any():
            return Selection(keep)
        # Streaming heads: candidates are right-aligned, so column c is a head's (c - (size - real))th.
        column = torch.arange(size, device=scores.device).expand(batch, heads, size)
        slot = int(self.compensate and budget > 0)
        age = column - (size - real)[..., None]  # 0 for a head's oldest candidate
        sunk = valid & (candidates.positions < self.sink) & (age < budget - slot)
        recent = (budget - sunk.sum(dim=-1, keepdim=True) - slot).clamp(0, self.recent)
        kept = sunk | (valid & (column >= size - recent))
        dropped = valid & ~kept
        into = torch.full((batch, heads, size), -1, dtype=torch.long, device=scores.device)
        if slot:
            # The oldest dropped entry (the earlier compensation entry, once there is one) takes the rest.
            target = torch.where(dropped, column, size).min(dim=-1, keepdim=True).values
            has_target = target < size
            kept = kept | (column == target)
            into = torch.where(dropped & (column != target) & has_target, target.expand_as(into), into)
        stream = streaming[None, :, None]
        return Selection(
            torch.where(stream, kept, keep), torch.where(stream, into, torch.full_like(into, -1))
        )


def top_fraction(table: torch.Tensor, fraction: float) -> torch.Tensor:
    """The ``round(fraction x heads)`` largest entries of ``table`` over all layers and heads, as a mask."""
    count = round(fraction * table.numel())
    chosen = torch.zeros(table.numel(), dtype=torch.bool)
    if count:
        chosen[table.flatten().topk(count).indices] = True
    return chosen.view(table.shape)
