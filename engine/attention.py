"""The ``attend`` callback the model calls once per layer: rotate, remember, attend, compress.

Compression happens here, right after the layer's attention and from that layer's statistics, so no
more than one layer's statistics ever exist at a time.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from backends import Backend, Distant, KeyStats, Packed, Segments
from engine.cache import KVMemory, LayerMemory
from engine.pod import PodPlan, adapted, fit_adapter
from models.rope import Rope
from policies import Candidates, Policy, PolicyError, Selection

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
    pod: PodPlan | None = None  # distant keys shared across layers (``engine.pod``)


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
        self._segment_angles: tuple[list[list[int]], torch.Tensor, torch.Tensor] | None = None
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
        queries = q
        uniform = layer_memory.uniform
        if uniform:
            cos, sin = self._angles(layer_memory.length, q.shape[2], original, q.dtype)
            q = Rope.apply(q, cos, sin)
            layer_memory.append(k, Rope.apply(k, cos, sin), v, original, queries)
        else:
            q, rotated = self._rotate_segments(layer, layer_memory, q, k, original)
            layer_memory.append(k, rotated, v, original, queries)
        decoding = q.shape[2] == 1
        if decoding and layer_memory.low is not None and setup.backend.reads_packed:
            keys, values, bias = layer_memory.packed(), None, None  # dequantized as the kernel reads
        elif uniform:
            keys, values, bias = layer_memory.rotated, layer_memory.values, layer_memory.bias
        else:
            keys, values, bias = self._segments(layer_memory), None, None
        attend = setup.backend.decode if decoding else setup.backend.prefill
        distant = self._distant(layer, layer_memory, original) if setup.pod is not None else None
        # Only features in use are passed: a plugin backend written for plain memories still serves them.
        result = attend(q, keys, values, window=setup.window, **_given(bias=bias, distant=distant))
        self._compress(layer, layer_memory, q, keys, result.lse, new, bias)
        return result.out

    def _rotate_segments(
        self, layer: int, memory: LayerMemory, q: torch.Tensor, k: torch.Tensor, original: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q and k rotated for KV heads of different lengths: in compact positions each head's new
        rows continue from its own length (and the query heads of its group with them)."""
        if self.setup.positions != "compact":
            cos, sin = self._angles(0, q.shape[2], original, q.dtype)
            return Rope.apply(q, cos, sin), Rope.apply(k, cos, sin)
        cos, sin = self._compact_angles(layer, memory, q.shape[2], q.dtype)  # [B, Hkv, n, D]
        batch, q_heads, count, dim = q.shape
        grouped = q.view(batch, k.shape[1], q_heads // k.shape[1], count, dim)
        rotated_q = Rope.apply(grouped, cos[:, :, None], sin[:, :, None]).view(q.shape)
        return rotated_q, Rope.apply(k, cos, sin)

    def _compact_angles(
        self, layer: int, memory: LayerMemory, count: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [B, Hkv, count, D] continuing each KV head from its own length. A decode step
        looks them up for every layer at once, at its first such layer (one lookup per layer costs
        about as much as the layer's attention); a layer's lengths change only in its own call, so
        later layers find theirs ready."""
        if count == 1:
            made = self._segment_angles
            if made is None or made[1].dtype != dtype:
                lengths = [list(each.lengths) for each in self.memory.layers]
                made = self._segment_angles = (lengths, *self._angles_at(lengths, count, dtype))
            if made[0][layer] == memory.lengths:
                return made[1][layer], made[2][layer]
        cos, sin = self._angles_at([memory.lengths], count, dtype)
        return cos[0], sin[0]

    def _angles_at(
        self, lengths: list[list[int]], count: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [layers, B, Hkv, count, D] at positions length .. length + count - 1."""
        device = self.setup.rope.inv_freq.device
        shape = (len(lengths), *self.memory.layers[0].shape, 1)
        positions = torch.tensor(lengths, device=device).view(shape) + torch.arange(count, device=device)
        return self.setup.rope.at(positions, dtype)

    def _distant(self, layer: int, memory: LayerMemory, original: torch.Tensor) -> Distant | None:
        """POD's distant keys for ``layer``: each follower KV head reads its block leader's (a lower
        layer, so it already holds this step's keys); every layer holds the same tokens (the memory
        is not compressed)."""
        pod = self.setup.pod
        followers = pod.followers(layer)
        if not followers:
            return None
        leaders = pod.leaders[layer]
        sources = [self.memory.layers[leader] for leader in leaders]
        keys = torch.stack([source.rotated[:, head] for head, source in enumerate(sources)], dim=1)
        positions = memory.positions[0, 0]
        if pod.adapt:  # fitted on the proximal tokens of the newest query, whose own keys a follower keeps
            proximal = (positions < pod.initial) | (positions > int(original[-1]) - pod.recent)
            lead = torch.stack([source.keys[:, head] for head, source in enumerate(sources)], dim=1)
            scale = fit_adapter(memory.keys[:, :, proximal], lead[:, :, proximal])
            leading = torch.tensor([leader == layer for leader in leaders], device=scale.device)
            keys = adapted(keys, scale.masked_fill(leading[:, None], 1))  # a leader's keys are its own
        return Distant(keys, original, positions, pod.initial, pod.recent)

    @staticmethod
    def _segments(memory: LayerMemory) -> Segments:
        bias = None if memory.bias_flat is None else memory.flat("bias")
        return Segments(
            memory.flat("rotated"), memory.flat("values"), list(memory.offsets), list(memory.lengths),
            memory.shape, bias,
        )  # fmt: skip

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
        keys: torch.Tensor | Segments | Packed,
        lse: torch.Tensor | None,
        new: int,
        bias: torch.Tensor | None,
    ) -> None:
        policy = self.setup.policy
        sinks = min(self.memory.sinks, self.start + new)
        kept = [length - self.observers for length in memory.lengths]
        sizes = [count - sinks for count in kept]
        budget = (
            None if self.budget is None else policy.layer_budget(self.budget, layer, self.setup.num_layers)
        )
        # A head-wise policy may cap some heads far below the budget (a streaming head's recent window),
        # a demoting one fill its full-precision share before the budget: they decide each step, not
        # only when the longest head outgrows the budget.
        every_step = policy.head_wise or policy.low_bits is not None
        compress = budget is not None and (max(sizes) > budget or every_step)
        observed = compress or (policy.needs.every_step and self.budget is not None)
        stats = None
        if policy.needs.queries is not None and observed:
            last = self.query_rows if self.query_rows is not None else policy.needs.last
            stats = self.setup.backend.scores(
                q, keys, lse=lse, last=last, window=self.setup.window,
                **_given(bias=bias, by_query_head=policy.needs.by_query_head),
            )  # fmt: skip
        memory.truncate(kept)
        if not observed:
            return
        if memory.uniform and not (policy.head_wise or policy.merges or policy.low_bits is not None):
            self._select_uniform(layer, memory, stats, sinks, kept[0], new, compress, budget)
        else:
            self._select_segments(layer, memory, stats, sinks, kept, new, compress, budget)

    def _candidates(self, layer: int, new: int, **fields) -> Candidates:
        return Candidates(layer=layer, num_layers=self.setup.num_layers, step=self.step, new=new, **fields)

    def _select_uniform(
        self, layer: int, memory: LayerMemory, stats: KeyStats | None, sinks: int, kept: int, new: int,
        compress: bool, budget: int | None,
    ) -> None:  # fmt: skip
        """Every head holds the same entries' count and the policy keeps it so: plain tensors."""
        policy, size = self.setup.policy, kept - sinks
        candidates = self._candidates(
            layer, min(new, size),
            keys=memory.keys[:, :, sinks:], values=memory.values[:, :, sinks:],
            positions=memory.positions[:, :, sinks:],
            stats=None if stats is None else KeyStats(stats.mass[..., sinks:kept], stats.count[sinks:kept]),
            state={name: memory.state(name)[:, :, sinks:] for name in policy.state},
            bias=None if memory.bias is None else memory.bias[:, :, sinks:],
        )  # fmt: skip
        policy.update(candidates)
        if not compress:
            return
        keep = _checked(policy.select(candidates, budget), budget, size, policy, candidates.keys.shape[:2])
        if keep.dtype == torch.bool:  # a plugin's mask: keep by segments
            self._keep_segments(
                memory, [row.nonzero()[:, 0] for row in keep.reshape(memory.segments, -1)], sinks
            )
            return
        sink_index = torch.arange(sinks, device=keep.device).expand(*keep.shape[:2], sinks)
        memory.keep(torch.cat((sink_index, keep + sinks), dim=-1))
        if self.setup.positions == "compact":
            memory.set_rotated(self.setup.rope.rotate)

    def _select_segments(
        self, layer: int, memory: LayerMemory, stats: KeyStats | None, sinks: int, kept: list[int], new: int,
        compress: bool, budget: int | None,
    ) -> None:  # fmt: skip
        """Heads of different lengths, or a policy that makes them: candidates padded on the left."""
        policy = self.setup.policy
        sizes = [count - sinks for count in kept]
        width = max(sizes)
        positions, valid = memory.window("positions", sinks, kept)
        fields = {name: memory.window(name, sinks, kept)[0] for name in ("keys", "values")}
        states = {name: memory.window(f"state.{name}", sinks, kept)[0] for name in policy.state}
        if stats is not None:
            mass, count = stats
            if count.dim() == 1:  # uniform statistics: every head its full length
                count = count.expand(*memory.shape, count.shape[-1])
            stats = KeyStats(_last(mass[..., : mass.shape[-1] - self.observers], width),
                             _last(count[..., : count.shape[-1] - self.observers], width))  # fmt: skip
        candidates = self._candidates(
            layer, min(new, width), stats=stats, state=states, valid=None if valid.all() else valid,
            bias=None if memory.bias_flat is None else memory.window("bias", sinks, kept)[0],
            low=None if memory.low is None else memory.window("low", sinks, kept)[0] & valid,
            positions=positions, **fields,
        )  # fmt: skip
        policy.update(candidates)
        for name, values in states.items():
            memory.write_window(f"state.{name}", values, sinks, kept)
        if not compress:
            return
        selection = policy.select(candidates, budget)
        keep, into, low = _checked_selection(selection, candidates, budget, policy)
        if low is not None and memory.low is None:
            raise PolicyError(
                f"policy {type(policy).__name__} demotes entries, but this memory has no low-precision "
                "tier: make it with the policy's low_bits (LLM.memory_for)"
            )
        starts = [width - size for size in sizes]
        if into is not None:
            self._merge(memory, keep, into, valid, sinks, starts)
        rows = [
            (row.nonzero()[:, 0] - start)
            for row, start in zip(keep.reshape(memory.segments, -1), starts, strict=True)
        ]
        demoted = None
        if low is not None:  # each segment's demoted entries, counted among the entries it keeps
            demoted = [
                flags[kept_row].nonzero()[:, 0]
                for flags, kept_row in zip(
                    low.reshape(memory.segments, -1), keep.reshape(memory.segments, -1), strict=True
                )
            ]
        self._keep_segments(memory, rows, sinks, demoted)

    def _merge(self, memory, keep, into, valid, sinks, starts) -> None:
        """Fold the dropped candidates that have a target into it (flat indices of the memory)."""
        dropped = (~keep) & valid & (into >= 0)
        if not dropped.any():
            return
        segments, columns = dropped.reshape(memory.segments, -1).nonzero(as_tuple=True)
        targets_column = into.reshape(memory.segments, -1)[segments, columns]
        offsets = torch.tensor(memory.offsets, device=keep.device)[segments] + sinks
        shift = torch.tensor(starts, device=keep.device)[segments]
        targets = offsets + targets_column - shift
        memory.merge(targets, offsets + columns - shift)
        if self.setup.positions != "compact":  # merged keys: rotated again at their own positions
            flat_targets = targets.unique()
            rotated = self.setup.rope.rotate(
                memory.flat("keys")[flat_targets], memory.flat("positions")[flat_targets]
            )
            memory.write_rows("rotated", flat_targets, rotated)

    def _keep_segments(
        self,
        memory: LayerMemory,
        rows: list[torch.Tensor],
        sinks: int,
        demoted: list[torch.Tensor] | None = None,
    ) -> None:
        """Keep the candidates ``rows`` of each segment (and the sinks); ``demoted``: which of the kept
        (their ranks among them) go to the low tier."""
        device = memory.flat("positions").device
        sink_index = torch.arange(sinks, device=device)
        memory.keep([torch.cat((sink_index, row + sinks)) for row in rows])
        if demoted is not None:
            memory.demote(torch.cat([memory.offsets[s] + sinks + ranks for s, ranks in enumerate(demoted)]))
        if self.setup.positions == "compact":
            memory.set_rotated(self.setup.rope.rotate)


def _given(**options) -> dict:
    """The options that are set (not None or False)."""
    return {name: value for name, value in options.items() if value is not None and value is not False}


def _last(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """The last ``width`` columns, left-padded with zeros when there are fewer."""
    if tensor.shape[-1] >= width:
        return tensor[..., tensor.shape[-1] - width :]
    return torch.nn.functional.pad(tensor, (width - tensor.shape[-1], 0))


def _checked_selection(
    selection, candidates: Candidates, budget: int, policy: Policy
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """A selection as a keep mask [B, Hkv, n] over real candidates, its merge targets and its demoted
    entries, checked: the heads' total within the layer's budget times the heads (a head may keep
    more than ``budget`` when others keep less), merge targets kept entries of the same head, demoted
    entries kept ones."""
    name = type(policy).__name__
    shape = tuple(candidates.keys.shape[:3])
    into = low = None
    if isinstance(selection, Selection):
        selection, into, low = selection.keep, selection.into, selection.low
    if isinstance(selection, torch.Tensor) and selection.dtype != torch.bool:
        index = _checked(selection, budget, shape[2], policy, shape[:2])
        selection = torch.zeros(shape, dtype=torch.bool, device=index.device).scatter_(-1, index, True)
    if (
        not isinstance(selection, torch.Tensor)
        or selection.dtype != torch.bool
        or tuple(selection.shape) != shape
    ):
        raise PolicyError(
            f"policy {name} returned a selection that is not indices or a bool mask of shape {shape}"
        )
    valid = candidates.valid if candidates.valid is not None else torch.ones_like(selection)
    if (selection & ~valid).any():
        raise PolicyError(f"policy {name} kept padding: a head's missing entries")
    if (selection.sum(dim=(1, 2)) > budget * shape[1]).any():
        raise PolicyError(f"policy {name} kept more than the layer's budget of {budget} per head on average")
    if into is not None:
        if into.shape != selection.shape or into.dtype not in (torch.int64, torch.int32):
            raise PolicyError(f"policy {name} returned merge targets that are not int64 of shape {shape}")
        folded = (into >= 0) & ~selection & valid
        targets = into.clamp(0, shape[2] - 1)
        if (folded & ~selection.gather(-1, targets)).any():
            raise PolicyError(f"policy {name} folds entries into ones it does not keep")
        into = into.long()
    if low is not None:
        if low.shape != selection.shape or low.dtype != torch.bool:
            raise PolicyError(f"policy {name} returned a low tier that is not a bool mask of shape {shape}")
        if (low & ~selection).any():
            raise PolicyError(f"policy {name} demotes entries it does not keep")
    return selection, into, low


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
