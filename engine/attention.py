"""The ``attend`` callback the model calls once per layer: rotate, remember, attend, compress.

Compression happens here, right after the layer's attention and from that layer's statistics, so no
more than one layer's statistics ever exist at a time.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from backends import Backend, KeyStats
from engine.cache import KVMemory, LayerMemory
from models.rope import Rope
from policies import Candidates, Policy, PolicyError

POSITION_MODES = ("compact", "original")


class PrefillCancelled(Exception):
    """The caller's cancel event was set while a prompt was being read."""


# tap(layer, q, k, v, start): a layer's pre-RoPE q [B, Hq, n, D], k and v [B, Hkv, n, D] of the n new
# prompt tokens (observers excluded), the first at original position ``start``.
Tap = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, int], None]


@dataclass(frozen=True)
class AttentionSetup:
    """What stays fixed for a whole prefill or generation."""

    rope: Rope
    backend: Backend
    policy: Policy
    positions: str  # "compact": renumber [sinks; memory; new] as 0..n-1; "original": true positions
    window: int | None  # sliding window of the model, in key indices
    num_layers: int


class MemoryAttention:
    """The callback for one forward pass at step ``step`` that keeps ``budget`` tokens per layer.

    The tokens fed are new prompt tokens, then ``observers`` tokens that only observe: the question,
    run after a chunk so that the policy scores with its attention (query-aware compression, as in
    FINCH). Observers are dropped from the memory once their statistics are taken. ``query_rows``
    (observers, or the question's rows of the last chunk) overrides which query rows the statistics
    come from; by default the policy's ``needs`` decide. Setting ``cancel`` makes the next layer
    raise ``PrefillCancelled``; ``tap`` sees every layer's pre-RoPE q, k, v of the new tokens.
    """

    def __init__(
        self,
        memory: KVMemory,
        setup: AttentionSetup,
        *,
        budget: int | None,
        step: int,
        observers: torch.Tensor | None = None,
        query_rows: int | None = None,
        cancel: threading.Event | None = None,
        tap: Tap | None = None,
    ) -> None:
        self.memory = memory
        self.cancel = cancel
        self.tap = tap
        self._original_positions: torch.Tensor | None = None
        self._angle_cache: dict[tuple[int | None, int, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}
        self.setup = setup
        self.budget = budget
        self.step = step
        self.start = memory.seen
        self.observer_positions = observers  # original positions of the observing tokens
        self.observers = 0 if observers is None else observers.numel()
        self.query_rows = query_rows

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # Checked once per layer: a long chunk stops within a layer's time, about a second at most.
        if self.cancel is not None and self.cancel.is_set():
            raise PrefillCancelled
        setup, layer_memory = self.setup, self.memory.layers[layer]
        new = q.shape[2] - self.observers
        if self.tap is not None:
            self.tap(layer, q[:, :, :new], k[:, :, :new], v[:, :, :new], self.start)
        original = self._original(new, q.device)
        cos, sin = self._angles(layer_memory.length, q.shape[2], original, q.dtype)
        q = Rope.apply(q, cos, sin)
        layer_memory.append(k, Rope.apply(k, cos, sin), v, original)
        keys, values = layer_memory.rotated, layer_memory.values
        attend = setup.backend.decode if q.shape[2] == 1 else setup.backend.prefill
        result = attend(q, keys, values, window=setup.window)
        self._compress(layer, layer_memory, q, keys, result.lse, new)
        return result.out

    def _original(self, new: int, device: torch.device) -> torch.Tensor:
        """The original positions of this step's rows (the same for every layer: made once)."""
        if self._original_positions is None:
            original = torch.arange(self.start, self.start + new, device=device)
            if self.observers:
                original = torch.cat((original, self.observer_positions.to(device)))
            self._original_positions = original
        return self._original_positions

    def _angles(
        self, length: int, count: int, original: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for the ``count`` new rows of a layer holding ``length`` entries; layers of
        equal length share them, so a decode step computes them once, not once per layer."""
        compact = self.setup.positions == "compact"
        key = (length if compact else None, count, dtype)
        if key not in self._angle_cache:
            rope = self.setup.rope
            if compact:
                self._angle_cache[key] = rope.span(length, count, dtype)
            elif self.observers:
                self._angle_cache[key] = rope.at(original, dtype)
            else:
                self._angle_cache[key] = rope.span(self.start, count, dtype)
        return self._angle_cache[key]

    def _compress(
        self,
        layer: int,
        memory: LayerMemory,
        q: torch.Tensor,
        keys: torch.Tensor,
        lse: torch.Tensor | None,
        new: int,
    ) -> None:
        policy = self.setup.policy
        kept = memory.length - self.observers
        sinks = min(self.memory.sinks, self.start + new)
        size = kept - sinks
        budget = (
            None if self.budget is None else policy.layer_budget(self.budget, layer, self.setup.num_layers)
        )
        compress = budget is not None and size > budget
        observed = compress or (policy.needs.every_step and self.budget is not None)
        stats = None
        if policy.needs.queries is not None and observed:
            last = self.query_rows if self.query_rows is not None else policy.needs.last
            mass, count = self.setup.backend.scores(q, keys, lse=lse, last=last, window=self.setup.window)
            stats = KeyStats(mass[..., sinks:kept], count[sinks:kept])
        memory.truncate(kept)
        if not observed:
            return
        candidates = Candidates(
            layer=layer,
            num_layers=self.setup.num_layers,
            step=self.step,
            keys=memory.keys[:, :, sinks:],
            values=memory.values[:, :, sinks:],
            positions=memory.positions[:, :, sinks:],
            new=min(new, size),
            stats=stats,
            state={name: memory.state(name)[:, :, sinks:] for name in policy.state},
        )
        policy.update(candidates)
        if not compress:
            return
        keep = _checked(policy.select(candidates, budget), budget, size, policy, candidates.keys.shape[:2])
        sink_index = torch.arange(sinks, device=keep.device).expand(*keep.shape[:2], sinks)
        memory.keep(torch.cat((sink_index, keep + sinks), dim=-1))
        if self.setup.positions == "compact":
            renumbered = torch.arange(memory.length, device=keep.device)
            memory.set_rotated(self.setup.rope.rotate(memory.keys, renumbered))


def _checked(
    keep: torch.Tensor, budget: int, size: int, policy: Policy, heads: tuple[int, int]
) -> torch.Tensor:
    """A plugin's selection must be [B, Hkv, k] sorted unique in-range indices with k <= budget, with
    exactly the memory's batch and KV heads (a [1, 1, k] answer would otherwise broadcast one head's
    choice over all of them)."""
    name = type(policy).__name__
    if (
        keep.dtype not in (torch.int64, torch.int32)
        or keep.dim() != 3
        or tuple(keep.shape[:2]) != tuple(heads)
    ):
        raise PolicyError(
            f"policy {name} returned {keep.dtype} of shape {tuple(keep.shape)}; expected int64 "
            f"[{heads[0]}, {heads[1]}, k] (batch, KV heads, kept tokens)"
        )
    if keep.shape[-1] > budget:
        raise PolicyError(f"policy {name} kept {keep.shape[-1]} tokens, over the budget of {budget}")
    if keep.numel() and (keep.min() < 0 or keep.max() >= size or (keep.diff(dim=-1) <= 0).any()):
        raise PolicyError(
            f"policy {name} returned indices that are not sorted, unique and within 0..{size - 1}"
        )
    return keep.long()
