"""KV compression policies: the contract, the registry and plugin loading.

After each chunk (and, with a decode budget, during generation) every layer offers its policy the
*candidates* — all tokens of its memory + the new chunk except the sinks, which are never evicted —
and the policy returns which to keep. A policy is a small class:

    @policies.register("knorm")
    class KeyNorm(Policy):
        def score(self, candidates):                 # higher = keep; [B, Hkv, n]
            return -candidates.keys.norm(dim=-1)

``Policy.select`` keeps the top ``budget`` scores per KV head, sorted. Override ``needs`` to receive
attention statistics, ``state`` + ``update`` to carry per-token state across steps, ``layer_budget``
for non-uniform budgets, or ``select`` itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from backends import KeyStats
from engine.registry import Registry, load_plugin


class PolicyError(ValueError):
    """A policy was misconfigured or returned an invalid selection."""


@dataclass(frozen=True)
class Needs:
    """Which attention statistics a policy wants from the backend.

    ``queries``: the attention mass each key receives from the chunk's last ``queries`` queries, from
    ``"all"`` of them, or ``None`` for no attention statistics. ``every_step``: also on steps that do
    not compress (policies that accumulate, like H2O).
    """

    queries: int | str | None = None
    every_step: bool = False

    @property
    def last(self) -> int | None:
        """The ``last`` argument of ``Backend.scores``."""
        return None if self.queries == "all" else self.queries


@dataclass
class Candidates:
    """One layer's tokens that may be evicted (everything after the sinks), oldest first."""

    layer: int
    num_layers: int
    step: int
    keys: torch.Tensor  # [B, Hkv, n, D] pre-RoPE
    values: torch.Tensor  # [B, Hkv, n, D]
    positions: torch.Tensor  # [B, Hkv, n] original positions
    new: int  # the last ``new`` candidates arrived in this step
    stats: KeyStats | None  # mass [B, Hkv, n], count [n]; present when the policy's needs ask for it
    state: dict[str, torch.Tensor]  # [B, Hkv, n] float32 views into the memory, writable

    @property
    def size(self) -> int:
        return self.keys.shape[2]


class Policy:
    needs: ClassVar[Needs] = Needs()
    state: ClassVar[tuple[str, ...]] = ()

    def layer_budget(self, budget: int, layer: int, num_layers: int) -> int | None:
        """Tokens this layer may keep given the step's budget; ``None`` keeps everything."""
        return budget

    def update(self, candidates: Candidates) -> None:
        """Fold this step's statistics into the per-token state (called before any selection)."""

    def score(self, candidates: Candidates) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement score() or select()")

    def select(self, candidates: Candidates, budget: int) -> torch.Tensor:
        """Indices [B, Hkv, k] into the candidates, sorted ascending per head, unique, k <= budget."""
        scores = self.score(candidates)
        return scores.topk(budget, dim=-1, sorted=False).indices.sort(dim=-1).values


def keep_recent(scores: torch.Tensor, recent: int) -> torch.Tensor:
    """Scores with the last ``recent`` entries raised above all others, the newest highest."""
    recent = min(recent, scores.shape[-1])
    if recent == 0:
        return scores
    raised = scores.clone()
    raised[..., -recent:] = scores.max() + 1 + torch.arange(recent, device=scores.device, dtype=scores.dtype)
    return raised


_registry: Registry[Policy] = Registry("policy", entry_point_group="engine.policies")
register = _registry.register
get = _registry.get
available = _registry.available

__all__ = [
    "Candidates",
    "Needs",
    "Policy",
    "PolicyError",
    "available",
    "get",
    "keep_recent",
    "load_plugin",
    "register",
]

from policies import attention as _attention  # noqa: E402,F401
from policies import h2o as _h2o  # noqa: E402,F401
from policies import key_norm as _key_norm  # noqa: E402,F401
from policies import positional as _positional  # noqa: E402,F401
from policies import snapkv as _snapkv  # noqa: E402,F401
