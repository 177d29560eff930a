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

How many tokens each head keeps, or which role a head plays, is a ``Wrapper`` around any scorer:
``adakv(h2o)`` is H2O's scores under AdaKV's head-wise budgets. ``get("adakv(h2o)", alpha=0.1)``
builds it, each option going to whichever of the two takes it.

KV heads may hold different numbers of entries (head-wise budgets, head roles). The candidates are
then padded on the left to the longest head, so that the newest sit last in every head as always;
``valid`` marks the real ones, and scores of padding are ignored. A selection is an index tensor
[B, Hkv, k] (the same count in every head), a boolean keep mask [B, Hkv, n] (counts of their own),
or a ``Selection`` that also folds dropped entries into kept ones (merging rather than evicting) or
moves kept ones to a low-precision tier (``low_bits``: demoting rather than evicting, as MiKV).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

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
    not compress (policies that accumulate, like H2O). ``by_query_head``: the mass per query head
    [B, Hq, n] rather than summed over each KV head's group.
    """

    queries: int | str | None = None
    every_step: bool = False
    by_query_head: bool = False

    @property
    def last(self) -> int | None:
        """The ``last`` argument of ``Backend.scores``."""
        return None if self.queries == "all" else self.queries


@dataclass
class Candidates:
    """One layer's tokens that may be evicted (everything after the sinks), oldest first; heads of
    different lengths padded on the left (see ``valid``)."""

    layer: int
    num_layers: int
    step: int
    keys: torch.Tensor  # [B, Hkv, n, D] pre-RoPE
    values: torch.Tensor  # [B, Hkv, n, D]
    positions: torch.Tensor  # [B, Hkv, n] original positions
    new: int  # the last ``new`` candidates arrived in this step
    stats: KeyStats | None  # mass [B, Hkv, n], count [n] or [B, Hkv, n]; when the policy's needs ask
    state: dict[str, torch.Tensor]  # [B, Hkv, n] float32, writable (what the policy keeps per token)
    valid: torch.Tensor | None = None  # [B, Hkv, n] bool: real entries; None when every head is full
    bias: torch.Tensor | None = None  # [B, Hkv, n] log of the tokens an entry stands for; None: all one
    low: torch.Tensor | None = None  # [B, Hkv, n] bool: held at low precision (a two-tier memory)

    @property
    def size(self) -> int:
        return self.keys.shape[2]

    def mask(self, scores: torch.Tensor) -> torch.Tensor:
        """``scores`` with padding at -inf, so that no selection takes it."""
        return scores if self.valid is None else scores.masked_fill(~self.valid, float("-inf"))


@dataclass
class Selection:
    """What a layer keeps (``keep`` [B, Hkv, n] bool) and where dropped entries go: ``into`` [B, Hkv, n]
    gives the index of the kept entry a dropped one folds into (its key and value averaged in by how
    many tokens each stands for), or -1 to drop it. ``low`` [B, Hkv, n] marks kept entries to hold in
    the memory's low-precision tier (a policy with ``low_bits``); entries already there stay there."""

    keep: torch.Tensor
    into: torch.Tensor | None = None
    low: torch.Tensor | None = None


@dataclass(frozen=True)
class ModelFacts:
    """What a policy may know of the model it compresses, given once before the first step."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    # A section of the model's calibration file (``python -m tools.find_heads``); raises a ValueError
    # naming the command that makes the file when there is none.
    calibration: Callable[[str], dict]
    calibrate_command: str = "python -m tools.find_heads -m CHECKPOINT"

    def head_table(self, section: str, name: str, *, query_heads: bool = False) -> torch.Tensor:
        """``name`` of a calibration section as a float tensor [layers, heads] (KV heads unless
        ``query_heads``), refused with the command to remake it when its shape is not this model's."""
        heads = self.num_heads if query_heads else self.num_kv_heads
        values = self.calibration(section).get(name)
        try:
            table = torch.tensor(values, dtype=torch.float32)
        except (TypeError, ValueError):
            table = None
        if table is None or tuple(table.shape) != (self.num_layers, heads):
            raise PolicyError(
                f"the calibration's {section}.{name} is not a table of {self.num_layers} layers x {heads} "
                f"heads for this model: run `{self.calibrate_command}` to remake it"
            )
        return table


class Policy:
    needs: ClassVar[Needs] = Needs()
    state: ClassVar[tuple[str, ...]] = ()
    # Whether the policy gives heads different counts (the memory then holds them as they are, and the
    # policy is asked every step, since a head may be over its own share while the longest fits the
    # budget) and folds entries together (attention then weighs an entry by the tokens it stands for).
    head_wise: ClassVar[bool] = False
    merges: ClassVar[bool] = False
    # Bits of the low-precision tier the policy demotes entries to (its memory then has two tiers; the
    # policy is asked every step, since its full-precision tier may be full before the whole budget),
    # and the share of the budget it keeps at full precision (how a budget in bytes becomes tokens).
    low_bits: int | None = None
    high_share: float = 1.0

    def prepare(self, model: ModelFacts) -> None:
        """Read what the policy needs of the model (e.g. its calibration) before the first step."""

    def layer_budget(self, budget: int, layer: int, num_layers: int) -> int | None:
        """Tokens this layer may keep given the step's budget; ``None`` keeps everything."""
        return budget

    def update(self, candidates: Candidates) -> None:
        """Fold this step's statistics into the per-token state (called before any selection)."""

    def score(self, candidates: Candidates) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement score() or select()")

    def select(self, candidates: Candidates, budget: int) -> torch.Tensor:
        """Indices [B, Hkv, k] into the candidates, sorted ascending per head, unique, k <= budget (or
        a keep mask / ``Selection``, see the module)."""
        return top_per_head(candidates, candidates.mask(self.score(candidates)), budget)


@dataclass
class Wrapper(Policy):
    """A policy around another one, ``scorer`` (a policy or its name): the wrapper decides how many
    tokens each head keeps or what role it plays; the scorer's scores decide which tokens."""

    scorer: Policy | str = "snapkv"

    def __post_init__(self) -> None:
        if isinstance(self.scorer, str):
            self.scorer = get(self.scorer)
        if not isinstance(self.scorer, Policy):
            raise PolicyError(f"{type(self).__name__} wraps a policy, not {self.scorer!r}")

    @property
    def needs(self) -> Needs:  # type: ignore[override]
        return self.scorer.needs

    @property
    def state(self) -> tuple[str, ...]:  # type: ignore[override]
        return self.scorer.state

    def prepare(self, model: ModelFacts) -> None:
        self.scorer.prepare(model)

    def layer_budget(self, budget: int, layer: int, num_layers: int) -> int | None:
        return self.scorer.layer_budget(budget, layer, num_layers)

    def update(self, candidates: Candidates) -> None:
        self.scorer.update(candidates)

    def score(self, candidates: Candidates) -> torch.Tensor:
        return candidates.mask(self.scorer.score(candidates))


def top_per_head(candidates: Candidates, scores: torch.Tensor, budget: int) -> torch.Tensor:
    """The ``budget`` best entries of each head (all of a shorter head's): sorted indices when every
    head is full, else a keep mask."""
    chosen = scores.topk(min(budget, scores.shape[-1]), dim=-1, sorted=False).indices.sort(dim=-1).values
    if candidates.valid is None:
        return chosen
    keep = torch.zeros_like(candidates.valid).scatter_(-1, chosen, True) & candidates.valid
    return keep


def keep_counts(candidates: Candidates, scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """A keep mask [B, Hkv, n] with the ``counts[b, h]`` best real entries of each head."""
    order = scores.argsort(dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order).scatter_(
        -1, order, torch.arange(scores.shape[-1], device=scores.device).expand_as(order)
    )
    keep = ranks < counts[..., None]
    return keep if candidates.valid is None else keep & candidates.valid


def apportion(total: int, weights: list[float], floor: int, capacity: list[int]) -> list[int]:
    """``total`` split into whole shares in proportion to ``weights``: each at least ``floor`` and at
    most its ``capacity``, what a full share cannot take going to the others, the remainder by the
    largest fractions. The shares sum to ``total`` unless the capacities are smaller."""
    shares = [min(floor, cap) for cap in capacity]
    while (left := total - sum(shares)) > 0:
        open_ = [i for i, cap in enumerate(capacity) if shares[i] < cap]
        if not open_:
            break
        weight = sum(max(weights[i], 0.0) for i in open_)
        exact = {i: left * (max(weights[i], 0.0) / weight if weight > 0 else 1 / len(open_)) for i in open_}
        given = {i: min(int(exact[i]), capacity[i] - shares[i]) for i in open_}
        if not any(given.values()):  # less than one each: the largest fractions get one
            for i in sorted(open_, key=lambda i: (-exact[i], i))[:left]:
                given[i] = 1
        for i, amount in given.items():
            shares[i] += amount
    return shares


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
available = _registry.available
_WRAPPED = re.compile(r"([\w.-]+)\((.+)\)")


def get(name: str, **options: Any) -> Policy:
    """The policy ``name`` built with ``options``; ``outer(inner)`` wraps the policy ``inner`` in the
    wrapper ``outer``, each option going to the one that takes it (the wrapper when both do)."""
    wrapped = _WRAPPED.fullmatch(name.strip())
    if wrapped is None:
        return _registry.get(name, **options)
    outer, inner = wrapped.groups()
    factory = _registry.factory(outer)
    if not (isinstance(factory, type) and issubclass(factory, Wrapper)):
        raise PolicyError(f"policy {outer!r} does not wrap another policy; wrappers: {', '.join(wrappers())}")
    own = _registry.options(outer)
    mine = {key: value for key, value in options.items() if key in own and key != "scorer"}
    rest = {key: value for key, value in options.items() if key not in mine}
    return _registry.get(outer, scorer=get(inner, **rest), **mine)


def wrappers() -> list[str]:
    """The registered policies that wrap another (``adakv(snapkv)``)."""
    return [
        name
        for name in available()
        if isinstance(factory := _registry.factory(name), type) and issubclass(factory, Wrapper)
    ]


__all__ = [
    "Candidates",
    "ModelFacts",
    "Needs",
    "Policy",
    "PolicyError",
    "Selection",
    "Wrapper",
    "apportion",
    "available",
    "get",
    "keep_counts",
    "keep_recent",
    "load_plugin",
    "register",
    "top_per_head",
    "wrappers",
]

from policies import adakv as _adakv  # noqa: E402,F401
from policies import attention as _attention  # noqa: E402,F401
from policies import compresskv as _compresskv  # noqa: E402,F401
from policies import duo as _duo  # noqa: E402,F401
from policies import ems as _ems  # noqa: E402,F401
from policies import h2o as _h2o  # noqa: E402,F401
from policies import key_norm as _key_norm  # noqa: E402,F401
from policies import mikv as _mikv  # noqa: E402,F401
from policies import positional as _positional  # noqa: E402,F401
from policies import pyramidkv as _pyramidkv  # noqa: E402,F401
from policies import razor as _razor  # noqa: E402,F401
from policies import snapkv as _snapkv  # noqa: E402,F401
from policies import uncomp as _uncomp  # noqa: E402,F401
