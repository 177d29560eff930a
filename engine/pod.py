"""POD: proximal tokens over distant tokens (Ma et al., arXiv 2412.02252), keys shared across layers.

Attention to distant tokens is much alike in consecutive layers, while the proximal ones (the first
``initial`` and the last ``recent`` before a query) matter most. POD groups consecutive layers into
blocks, per KV head, by how alike their attention to distant tokens is (``group_layers``, on
similarities measured offline by ``python -m tools.find_heads --methods pod``). Within a block every
layer keeps its own keys for proximal tokens and its own values, and scores distant tokens against
the keys of the block's lowest layer, its leader: one softmax over both (``backends.Distant``).

The paper adapts the model to this by continued training (about 5B tokens); here it runs on the
model as it is, so expect a loss that a stricter ``threshold`` (shorter blocks) reduces.

Parameters: ``threshold`` (0.5, the paper's): a layer joins the block below when the similarity of
its distant attention to the block leader's is at least this (0: one block per head, 1: no sharing);
``initial`` (16, the paper's) and ``recent`` (1024: the paper keeps 4080 of a 32k context, an eighth;
an eighth of the default model's 8192-token window) proximal tokens; ``adapt`` (off): a training-free
mitigation, a closed-form key adapter (``fit_adapter``) that maps the leader's keys towards the
follower's own, fitted at each step on the proximal tokens, for which a follower holds both.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

NAME = "pod"  # its section of the calibration file
OPTIONS = ("threshold", "initial", "recent", "adapt")


@dataclass(frozen=True)
class PodSettings:
    threshold: float = 0.5
    initial: int = 16
    recent: int = 1024
    adapt: bool = False

    def __post_init__(self) -> None:
        if self.adapt not in (True, False, 0, 1):
            raise ValueError(f"pod adapt must be 0 or 1, got {self.adapt!r}")
        object.__setattr__(self, "adapt", bool(self.adapt))
        threshold = self.threshold
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
            raise ValueError(f"pod threshold must be a number from 0 to 1, got {threshold!r}")
        for name in ("initial", "recent"):
            value, least = getattr(self, name), 1 if name == "recent" else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                least = "a positive" if name == "recent" else "a non-negative"
                raise ValueError(f"pod {name} must be {least} number of tokens, got {value!r}")

    @classmethod
    def of(cls, options: Mapping[str, Any]) -> PodSettings:
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise ValueError(f"unknown pod option {', '.join(unknown)}; choose from {', '.join(OPTIONS)}")
        return cls(**options)


@dataclass(frozen=True)
class PodPlan:
    """Which layer's keys each (layer, KV head) reads for distant tokens: ``leaders[layer][head]``."""

    leaders: tuple[tuple[int, ...], ...]
    initial: int
    recent: int
    adapt: bool = False

    def followers(self, layer: int) -> list[int]:
        """The KV heads of ``layer`` that read another layer's distant keys."""
        return [head for head, leader in enumerate(self.leaders[layer]) if leader != layer]

    @property
    def shared_fraction(self) -> float:
        """The fraction of (layer, KV head) pairs whose distant keys are another layer's."""
        pairs = [(layer, leader) for layer, row in enumerate(self.leaders) for leader in row]
        return sum(layer != leader for layer, leader in pairs) / len(pairs)

    def saving(self, tokens: int) -> float:
        """The fraction of K and V bytes (equal sizes) a POD memory of ``tokens`` tokens saves: the
        keys of followers' distant tokens (the notes' ``0.5 * f_D * (1 - blocks / layers)``)."""
        distant = max(0, tokens - self.initial - self.recent)
        return 0.5 * self.shared_fraction * distant / tokens if tokens else 0.0


def group_layers(similarity: Sequence[Sequence[Sequence[float]]] | torch.Tensor, threshold: float) -> tuple:
    """POD's greedy bottom-up grouping: per KV head, a layer joins the current block when its
    similarity to the block's lowest layer (whose keys it would read) is at least ``threshold``, and
    starts a new block otherwise. ``similarity`` [Hkv, L, L] (upper triangle read). Returns
    ``leaders[layer][head]``."""
    table = torch.as_tensor(similarity, dtype=torch.float64)
    kv_heads, layers, _ = table.shape
    leaders = [[0] * kv_heads for _ in range(layers)]
    for head in range(kv_heads):
        lead = 0
        for layer in range(1, layers):
            if table[head, lead, layer] < threshold:
                lead = layer
            leaders[layer][head] = lead
    return tuple(tuple(row) for row in leaders)


def js_similarity(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """1 - the Jensen-Shannon divergence (base 2, so in [0, 1]) of distributions along the last dim."""
    middle = (p + q) / 2

    def kl(a: torch.Tensor) -> torch.Tensor:
        return torch.where(a > 0, a * (a / middle.clamp_min(1e-30)).log2(), 0.0).sum(dim=-1)

    return 1 - ((kl(p) + kl(q)) / 2).clamp(0, 1)


def fit_adapter(own: torch.Tensor, leader: torch.Tensor) -> torch.Tensor:
    """The complex scale per rotary pair [..., D/2] that best maps ``leader``'s pre-RoPE keys onto
    ``own`` ([..., n, D], least squares over the n tokens): channels c and c + D/2 as one complex
    number, so that scaling commutes with RoPE (a rotation of each such pair) and serves rotated keys."""
    lead, mine = _complex(leader.float()), _complex(own.float())
    energy = lead.abs().square().sum(dim=-2)
    scale = (lead.conj() * mine).sum(dim=-2) / energy.clamp_min(1e-12)
    return torch.where(energy > 0, scale, 1)


def adapted(keys: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``keys`` [..., n, D] with each rotary pair multiplied by ``scale`` [..., D/2] (``fit_adapter``)."""
    result = torch.view_as_real(_complex(keys.float()) * scale[..., None, :])
    return torch.cat((result[..., 0], result[..., 1]), dim=-1).to(keys.dtype)


def _complex(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.complex(x[..., :half], x[..., half:])


def plan_for(llm: Any, settings: PodSettings) -> PodPlan:
    """The blocks of ``llm`` at ``settings.threshold``, from its calibration file."""
    section = llm.calibration(NAME)
    leaders = group_layers(section["similarity"], settings.threshold)
    return PodPlan(leaders, settings.initial, settings.recent, settings.adapt)
