"""The KV memory: per layer and KV head, the sinks then the kept entries, in original order.

Each entry carries its pre-RoPE key (so ``positions="compact"`` can renumber after a compression), the
key rotated at the position attention currently gives it (so decode never re-rotates the cache), its
value, its original position, a logit bias (``log`` of how many tokens it stands for: 0 for a token,
``log n`` for a merged or compensation entry), and any per-token state a policy keeps.

Every (batch, KV head) pair is a *segment* with its own number of entries: head-wise budgets and head
roles keep more in some heads than in others, and the memory holds only what is kept. Segments live
in flat buffers (``[capacity, D]``), segment s at ``offsets[s]`` with room for ``room[s]`` entries.
When every segment has the same length and room, packed in order, the buffers are also a
``[B, Hkv, n, D]`` tensor: the uniform case (every built-in policy but the head-wise ones) keeps the
plain rectangular layout and its speed. Room grows by doubling, so decode appends in amortised O(1).

With ``kv_bits`` the vectors are stored quantized (``engine.kv_quant``: packed codes, a scale and a
zero per vector, keys balanced per channel by MiKV's rule fixed on the first tokens); every read
dequantizes, so policies and backends see vectors of the usual shape.

With a ``low`` codec the memory has two tiers (MiKV): an entry's vectors sit either in the full-precision
store or, once ``demote``d, in the quantized one, and never move back up. The stores are not in entry
order: each entry's ``slot`` says where its vectors are (``slot >= 0``: row ``slot`` of the full-precision
store; ``slot < 0``: row ``-1 - slot`` of the quantized one), so every other operation (keep, merge,
windows, state) works on entries as in a one-tier memory. Reads assemble the entries' vectors in order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from backends import Packed
from engine.kv_quant import KVCodec, assemble, key_balancer

KINDS = ("keys", "rotated", "values")
GROWTH_MIN = 16  # entries a segment grows by at least


class LayerMemory:
    def __init__(
        self,
        batch: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        codec: KVCodec | None = None,
        low: KVCodec | None = None,
    ) -> None:
        if codec is not None and low is not None:
            raise ValueError("a memory is either quantized whole (codec) or in two tiers (low), not both")
        self.shape = (batch, kv_heads)
        self.head_dim = head_dim
        self.dtype = dtype
        self.codec = codec
        self.low = low
        segments = batch * kv_heads
        self.lengths = [0] * segments
        self.room = [0] * segments
        self.offsets = [0] * segments
        if codec is None:
            self._vectors = {kind: torch.empty(0, head_dim, dtype=dtype, device=device) for kind in KINDS}
        else:
            self._vectors = {
                kind: torch.empty(0, codec.packed_width, dtype=torch.uint8, device=device) for kind in KINDS
            }
        quantized = codec or low
        # Codes of the low tier (``_vectors`` then holds the full-precision tier), and the scale and
        # zero of every quantized vector: [C, 2] per kind (in entry order when the whole memory is).
        self._codes = {} if low is None else {
            kind: torch.empty(0, low.packed_width, dtype=torch.uint8, device=device) for kind in KINDS
        }  # fmt: skip
        self._params = {} if quantized is None else {kind: quantized.empty_params(device) for kind in KINDS}
        self._slot = None if low is None else torch.empty(0, dtype=torch.int32, device=device)
        # Rows of the full-precision tier in use; its stores keep room beyond them, as the entry
        # buffers do, so that a decode step's append does not copy the tier.
        self._high_rows = 0
        self._tiers_cache: tuple | None = None
        self._balance: torch.Tensor | None = None  # keys' balancer [segments, D], from the first tokens
        self._positions = torch.empty(0, dtype=torch.long, device=device)
        self._bias: torch.Tensor | None = None  # allocated by the first entry that needs one
        self._state: dict[str, torch.Tensor] = {}

    # ---- shape

    @property
    def segments(self) -> int:
        return len(self.lengths)

    @property
    def length(self) -> int:
        """Entries of the longest segment (of every segment when uniform)."""
        return max(self.lengths, default=0)

    @property
    def uniform(self) -> bool:
        """Every segment holds as many entries as the others, in the rectangular layout."""
        first = self.room[0] if self.room else 0
        return (
            len(set(self.lengths)) <= 1
            and all(room == first for room in self.room)
            and all(offset == index * first for index, offset in enumerate(self.offsets))
        )

    # ---- views

    def _dense(self, flat: torch.Tensor) -> torch.Tensor:
        if not self.uniform:
            raise RuntimeError(
                "segments of different lengths have no [B, Hkv, n] view: read them by segment()"
            )
        return self._dense_room(flat)[:, :, : self.length]

    @property
    def keys(self) -> torch.Tensor:
        """Pre-RoPE keys [B, Hkv, n, D] (uniform memories; ``segment`` for any)."""
        return self._dense(self.flat("keys"))

    @property
    def rotated(self) -> torch.Tensor:
        """Keys rotated at their current attention positions [B, Hkv, n, D]."""
        return self._dense(self.flat("rotated"))

    @property
    def values(self) -> torch.Tensor:
        return self._dense(self.flat("values"))

    @property
    def positions(self) -> torch.Tensor:
        """Original positions in the sequence [B, Hkv, n]."""
        return self._dense(self._positions)

    @property
    def bias_flat(self) -> torch.Tensor | None:
        """The flat bias buffer [C], or None while every entry is one token."""
        return self._bias

    @property
    def bias(self) -> torch.Tensor | None:
        """Logit biases [B, Hkv, n] (None while every entry is one token)."""
        return None if self._bias is None else self._dense(self._bias)

    def state(self, name: str) -> torch.Tensor:
        """Per-token policy state [B, Hkv, n] float32 (zeros for tokens the policy has not seen yet)."""
        return self._dense(self._state_buffer(name))

    def flat(self, kind: str) -> torch.Tensor:
        """A buffer in the flat layout: "keys", "rotated", "values" [C, D]; "positions", "bias" [C].
        A quantized memory's vectors come dequantized: a copy, written through ``write_rows``."""
        if kind in KINDS:
            if self.low is not None:
                return self._assembled(kind)
            return self._vectors[kind] if self.codec is None else self._decoded(kind)
        if kind == "positions":
            return self._positions
        if kind == "low":  # which entries are in the low tier
            return self._slot < 0 if self._slot is not None else torch.zeros_like(self._positions).bool()
        if kind == "bias":
            return self._bias_buffer()
        return self._state_buffer(kind.removeprefix("state."))

    def segment(self, index: int, kind: str) -> torch.Tensor:
        """Segment ``index``'s entries of one buffer (see ``flat``): [n_s, D] or [n_s]."""
        start = self.offsets[index]
        return self.flat(kind)[start : start + self.lengths[index]]

    def window(self, kind: str, first: int, stops: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Entries ``first``..``stops[s]`` of every segment, right-aligned and left-padded to the
        widest: [B, Hkv, width, ...] and which of them are real ([B, Hkv, width] bool)."""
        width = max((stop - first for stop in stops), default=0)
        flat = self.flat(kind)
        index, valid = self._window_index(first, stops, width)
        return flat[index.clamp_min(0)].view(*self.shape, width, *flat.shape[1:]), valid

    def write_window(self, kind: str, values: torch.Tensor, first: int, stops: Sequence[int]) -> None:
        """Write back the real entries of a ``window`` of ``kind``."""
        width = values.shape[2]
        index, valid = self._window_index(first, stops, width)
        flat = self.flat(kind)
        flat[index[valid]] = values.reshape(-1, *flat.shape[1:])[valid.flatten()].to(flat.dtype)

    def write_rows(self, kind: str, index: torch.Tensor, rows: torch.Tensor) -> None:
        """Store vectors ``rows`` [N, D] of ``kind`` at the flat indices ``index`` [N] (held entries, or
        slots ``append`` is filling), each in its entry's tier."""
        if self.low is not None:
            slots = self._slot[index].long()
            high = slots >= 0
            self._vectors[kind].index_copy_(0, slots[high], rows[high].to(self.dtype))
            if not high.all():
                low_rows = -1 - slots[~high]
                codes, params = self._encoded(index[~high], {kind: rows[~high]}, self.low)[kind]
                self._codes[kind].index_copy_(0, low_rows, codes)
                self._params[kind].index_copy_(0, low_rows, params)
            return
        if self.codec is None:
            self._vectors[kind].index_copy_(0, index, rows.to(self.dtype))
            return
        self._store_encoded(index, self._encoded(index, {kind: rows}, self.codec))

    def _store_encoded(
        self, index: torch.Tensor, encoded: dict[str, tuple[torch.Tensor, torch.Tensor]]
    ) -> None:
        """Write a one-tier quantized memory's codes and params of each kind at the flat ``index``."""
        for kind, (codes, params) in encoded.items():
            self._vectors[kind].index_copy_(0, index, codes)
            self._params[kind].index_copy_(0, index, params)

    def demote(self, index: torch.Tensor) -> None:
        """Move the held entries ``index`` (flat) that are still at full precision to the low tier."""
        slots = self._slot[index].long()
        index, slots = index[slots >= 0], slots[slots >= 0]
        start = self._codes["keys"].shape[0]
        encoded = self._encoded(index, {kind: self._vectors[kind][slots] for kind in KINDS}, self.low)
        for kind, (codes, params) in encoded.items():
            self._codes[kind] = torch.cat((self._codes[kind], codes))
            self._params[kind] = torch.cat((self._params[kind], params))
        self._slot[index] = (-1 - torch.arange(start, start + index.numel(), device=index.device)).int()
        self._compact_stores()

    def _encoded(
        self, index: torch.Tensor, rows: dict[str, torch.Tensor], codec: KVCodec
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Codes and params of the vectors ``rows[kind]`` [N, D] of the entries ``index``, keys
        balanced first. One encode serves every kind: a decode step writes a row per segment, where
        the count of operations, not their size, is the cost."""
        balance = self._balance[self._segment_of(index)] if any(kind != "values" for kind in rows) else None
        parts = [data.float() if kind == "values" else data.float() * balance for kind, data in rows.items()]
        codes, params = codec.encode(torch.cat(parts))
        count = index.numel()
        return {
            kind: (codes[i * count : (i + 1) * count], params[i * count : (i + 1) * count])
            for i, kind in enumerate(rows)
        }

    def _decoded(self, kind: str) -> torch.Tensor:
        vectors = self.codec.decode(self._vectors[kind], self._params[kind])
        if kind != "values" and vectors.shape[0]:
            if len(set(self.room)) == 1:  # equal rooms: a view, not a balancer row per entry each read
                self._dense_room(vectors).div_(self._balance.view(*self.shape, 1, self.head_dim))
            else:
                vectors.div_(
                    self._balance.repeat_interleave(torch.tensor(self.room, device=vectors.device), dim=0)
                )
        return vectors.to(self.dtype)

    def _assembled(self, kind: str) -> torch.Tensor:
        """A two-tier memory's vectors of ``kind`` in entry order [C, D], the low tier's dequantized."""
        order, low_balance = self._tier_order()
        if order is None:
            return self._vectors[kind].new_zeros(self._positions.shape[0], self.head_dim)
        balance = None if kind == "values" else low_balance
        return assemble(self.low, self._vectors[kind], self._codes[kind], self._params[kind], order, balance)

    def packed(self) -> Packed:
        """A two-tier memory's rotated keys and values as stored, for a backend that reads them so."""
        order, balance = self._tier_order()
        return Packed(
            order, self._vectors["rotated"], self._vectors["values"], self._codes["rotated"],
            self._codes["values"], self._params["rotated"], self._params["values"], balance, self.low.bits,
            list(self.offsets), list(self.lengths), self.shape, self._bias,
        )  # fmt: skip

    def _tier_order(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Each entry's row in [low store; full-precision store] (None while nothing is held), and the
        keys' balancer of each low-store row. Made once per change of the tiers (not per read, nor
        per append: see ``_extend_tier_order``); whatever moves a slot drops it."""
        key = (tuple(self.lengths), tuple(self.offsets))
        if self._tiers_cache is None or self._tiers_cache[0] != key:
            held = self._entries()
            slots = self._slot[held].long()
            high = slots >= 0
            low_rows = -1 - slots[~high]
            order = torch.zeros_like(self._positions)
            order[held] = torch.where(high, self._codes["keys"].shape[0] + slots, -1 - slots)
            balance = torch.ones(self._codes["keys"].shape[0], self.head_dim, device=held.device)
            if self._balance is not None:
                balance[low_rows] = self._balance[self._segment_of(held[~high])]
            self._tiers_cache = (key, (order if held.numel() else None, balance))
        return self._tiers_cache[1]

    def _extend_tier_order(self, index: torch.Tensor, before: tuple) -> None:
        """Add ``append``'s new entries ``index`` (full precision) to the ``_tier_order`` of the memory
        as it was ``before`` them (its lengths and offsets), when that is the one made."""
        if self._tiers_cache is None or self._tiers_cache[0] != before:
            self._tiers_cache = None
            return
        order, balance = self._tiers_cache[1]
        order = torch.zeros_like(self._positions) if order is None else order
        order[index] = self._codes["keys"].shape[0] + self._slot[index].long()
        self._tiers_cache = ((tuple(self.lengths), tuple(self.offsets)), (order, balance))

    def _compact_stores(self) -> None:
        """Drop the tiers' rows no held entry points at (evicted, demoted or forgotten entries)."""
        held = self._entries()
        slots = self._slot[held].long()
        high = slots >= 0
        device = held.device
        self._vectors = {kind: store[slots[high]] for kind, store in self._vectors.items()}
        low_rows = -1 - slots[~high]
        self._codes = {kind: store[low_rows] for kind, store in self._codes.items()}
        self._params = {kind: store[low_rows] for kind, store in self._params.items()}
        self._high_rows = int(high.sum())
        self._slot[held[high]] = torch.arange(self._high_rows, device=device, dtype=torch.int32)
        self._slot[held[~high]] = -1 - torch.arange(int((~high).sum()), device=device, dtype=torch.int32)
        self._tiers_cache = None

    def _segment_of(self, index: torch.Tensor) -> torch.Tensor:
        """The segment each flat index lies in."""
        starts = torch.tensor(self.offsets, device=index.device)
        return torch.bucketize(index, starts, right=True) - 1

    def _window_index(
        self, first: int, stops: Sequence[int], width: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        device = self._positions.device
        columns = torch.arange(width, device=device)
        counts = torch.tensor([stop - first for stop in stops], device=device)
        starts = torch.tensor(self.offsets, device=device) + first
        index = starts[:, None] + columns[None, :] - (width - counts)[:, None]
        valid = columns[None, :] >= (width - counts)[:, None]
        return torch.where(valid, index, -1).view(*self.shape, width), valid.view(*self.shape, width)

    def _state_buffer(self, name: str) -> torch.Tensor:
        if name not in self._state:
            self._state[name] = torch.zeros(self._positions.shape[0], device=self._positions.device)
        return self._state[name]

    def _bias_buffer(self) -> torch.Tensor:
        if self._bias is None:
            self._bias = torch.zeros(self._positions.shape[0], device=self._positions.device)
        return self._bias

    # ---- changes

    def append(
        self,
        keys: torch.Tensor,
        rotated: torch.Tensor,
        values: torch.Tensor,
        positions: torch.Tensor,
        queries: torch.Tensor | None = None,
    ) -> None:
        """Add ``L`` new tokens to every segment: keys/rotated/values [B, Hkv, L, D], positions [L] or
        [B, Hkv, L]; they carry no bias and zero policy state. A quantized memory fixes its keys'
        balancer on its first tokens from them and their pre-RoPE ``queries`` [B, Hq, L, D]."""
        new = keys.shape[2]
        if any(length + new > room for length, room in zip(self.lengths, self.room, strict=True)):
            self._grow(new)
        positions = positions.expand(*self.shape, new) if positions.dim() == 1 else positions
        if (self.codec is not None or self.low is not None) and self._balance is None:
            self._balance = (
                key_balancer(queries, keys).view(self.segments, self.head_dim)
                if queries is not None
                else keys.new_ones(self.segments, self.head_dim, dtype=torch.float32)
            )
        if self.uniform and self._direct:
            start, end = self.length, self.length + new
            for kind, data in zip(KINDS, (keys, rotated, values), strict=True):
                self._dense_room(self._vectors[kind])[:, :, start:end] = data
            self._dense_room(self._positions)[:, :, start:end] = positions
            for buffer in self._per_entry():
                self._dense_room(buffer)[:, :, start:end] = 0
        else:
            index = self._slots(new)
            if self.low is not None:  # new entries arrive at full precision
                start, end = self._high_rows, self._high_rows + index.numel()
                if end > self._vectors["keys"].shape[0]:
                    capacity = _grown(self._vectors["keys"].shape[0], end)
                    for kind in KINDS:
                        store = self._vectors[kind].new_empty(capacity, self.head_dim)
                        store[:start] = self._vectors[kind][:start]
                        self._vectors[kind] = store
                self._high_rows = end
                self._slot[index] = torch.arange(start, end, device=index.device).int()
            rows = {
                kind: data.reshape(-1, self.head_dim)
                for kind, data in zip(KINDS, (keys, rotated, values), strict=True)
            }
            if self.codec is not None:
                self._store_encoded(index, self._encoded(index, rows, self.codec))
            else:
                for kind, data in rows.items():
                    self.write_rows(kind, index, data)
            self._positions.index_copy_(0, index, positions.reshape(-1))
            for buffer in self._per_entry():
                buffer.index_fill_(0, index, 0)
        before = (tuple(self.lengths), tuple(self.offsets))
        self.lengths = [length + new for length in self.lengths]
        if self.low is not None:
            self._extend_tier_order(index, before)

    def keep(self, index: torch.Tensor | Sequence[torch.Tensor]) -> None:
        """Keep only the entries ``index``: [B, Hkv, m] (the same count in every segment), or one
        sorted 1-D index per segment (counts of their own), in that order."""
        if isinstance(index, torch.Tensor) and self.uniform:
            kept = index.shape[-1]
            for buffer in self._rows():
                dense = self._dense_room(buffer)
                rows = index if buffer.dim() == 1 else index[..., None].expand(-1, -1, -1, buffer.shape[1])
                dense[:, :, :kept] = dense[:, :, : self.length].gather(2, rows)
            self.lengths = [kept] * self.segments
            if self.low is not None:
                self._compact_stores()
            return
        per_segment = (
            list(index.reshape(self.segments, -1)) if isinstance(index, torch.Tensor) else list(index)
        )
        chosen = torch.cat([self.offsets[s] + rows for s, rows in enumerate(per_segment)])
        counts = [rows.numel() for rows in per_segment]
        # In place, each segment keeping its room for the next chunk (the gather copies the chosen
        # rows before any is written).
        destination = _ranges(self.offsets, counts, chosen.device)
        for buffer in self._rows():
            buffer[destination] = buffer[chosen]
        self.lengths = counts
        if self.low is not None:
            self._compact_stores()

    def merge(self, targets: torch.Tensor, sources: torch.Tensor) -> None:
        """Fold the entries ``sources`` into ``targets`` (flat indices, ``source[i]`` into ``target[i]``):
        each target's key and value become the count-weighted mean of itself and what folds into it,
        and its bias the log of the total count (an entry of bias b stands for e^b tokens). The
        sources are not removed here; ``keep`` does that."""
        bias = self._bias_buffer()
        counts = bias.exp()
        total = counts.clone().index_add_(0, targets, counts[sources])
        for kind in ("keys", "values"):
            weighted = self.flat(kind).float() * counts[:, None]
            weighted.index_add_(0, targets, weighted[sources])
            self.write_rows(kind, targets, weighted[targets] / total[targets, None])
        bias.index_copy_(0, targets, total[targets].log())

    def trim(self) -> None:
        """Give back the room beyond the entries held (after a prefill: decode grows it again)."""
        if self.room != self.lengths:
            self._repack(self._entries(), self.lengths)
        elif self.low is not None:
            self._compact_stores()

    def reserve(self, rooms: int | Sequence[int]) -> None:
        """Room for at least ``rooms`` entries in every segment (one count, or one per segment)."""
        wanted = [rooms] * self.segments if isinstance(rooms, int) else list(rooms)
        if any(want > room for want, room in zip(wanted, self.room, strict=True)):
            rooms = [max(want, room) for want, room in zip(wanted, self.room, strict=True)]
            self._repack(self._entries(), self.lengths, rooms)

    def truncate(self, lengths: int | Sequence[int]) -> None:
        """Forget each segment's newest entries beyond ``lengths`` (one count, or one per segment)."""
        limits = [lengths] * self.segments if isinstance(lengths, int) else list(lengths)
        self.lengths = [min(length, limit) for length, limit in zip(self.lengths, limits, strict=True)]

    def set_rotated(self, rotate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        """Rotate every segment's pre-RoPE keys again at positions 0..n_s-1 (``rotate(keys, positions)``)."""
        if self.uniform and self._direct:
            renumbered = torch.arange(self.length, device=self._positions.device)
            self._dense_room(self._vectors["rotated"])[:, :, : self.length] = rotate(self.keys, renumbered)
            return
        keys = self.flat("keys")
        for s in range(self.segments):
            index = _ranges([self.offsets[s]], [self.lengths[s]], self._positions.device)
            positions = torch.arange(self.lengths[s], device=self._positions.device)
            self.write_rows("rotated", index, rotate(keys[index], positions))

    def snapshot(self) -> dict[str, torch.Tensor]:
        """Copies of every entry's tensors, segment after segment, and the segments' lengths."""
        chosen = self._entries()
        if self.low is not None:  # the tiers' stores hold only what the entries point at
            self._compact_stores()
            saved = {kind: buffer.clone() for kind, buffer in self._vectors.items()}
            saved.update({f"codes.{kind}": buffer.clone() for kind, buffer in self._codes.items()})
            saved.update({f"params.{kind}": buffer.clone() for kind, buffer in self._params.items()})
            saved["slot"] = self._slot[chosen].clone()
        else:
            saved = {kind: buffer[chosen].clone() for kind, buffer in self._vectors.items()}
            saved.update({f"params.{kind}": buffer[chosen].clone() for kind, buffer in self._params.items()})
        if self._balance is not None:
            saved["balance"] = self._balance.clone()
        saved["positions"] = self._positions[chosen].clone()
        if self._bias is not None:
            saved["bias"] = self._bias[chosen].clone()
        saved.update({f"state.{name}": buffer[chosen].clone() for name, buffer in self._state.items()})
        saved["lengths"] = torch.tensor(self.lengths)
        return saved

    def restore(self, saved: dict[str, torch.Tensor]) -> None:
        """Hold exactly the entries of ``saved`` (a ``snapshot``) again."""
        lengths = (
            saved["lengths"].tolist()
            if "lengths" in saved
            else [saved["keys"].shape[0] // self.segments] * self.segments
        )
        device = self._positions.device
        self._vectors = {kind: saved[kind].to(device).clone() for kind in KINDS}
        self._high_rows = self._vectors["keys"].shape[0]
        self._params = {kind: saved[f"params.{kind}"].to(device).clone() for kind in self._params}
        self._codes = {kind: saved[f"codes.{kind}"].to(device).clone() for kind in self._codes}
        self._slot = None if self._slot is None else saved["slot"].to(device).clone()
        self._tiers_cache = None
        self._balance = saved["balance"].to(device).clone() if "balance" in saved else None
        self._positions = saved["positions"].to(device).clone()
        self._bias = saved["bias"].to(device).clone() if "bias" in saved else None
        self._state = {
            key.removeprefix("state."): value.to(device).clone()
            for key, value in saved.items()
            if key.startswith("state.")
        }
        self._layout(lengths, lengths)

    @property
    def nbytes(self) -> int:
        """Bytes of the buffers: the entries summed over segments (not the longest segment times the
        segments), and the room kept for the next ones (none after ``trim``; a quarter more than the
        entries after growing; a ``keep`` leaves the room as it was, for the next chunk)."""
        return sum(t.numel() * t.element_size() for t in (*self._rows(), *self._stores()))

    def held_bytes(self) -> int:
        """Bytes of the entries held, without the room kept for more (each in its own tier)."""
        held = sum(self.lengths)
        if self.low is None:
            return held * self.entry_bytes()
        low = int((self._slot[self._entries()] < 0).sum())
        return held * self.entry_bytes() + len(KINDS) * (
            (held - low) * self.vector_bytes + low * self.low.vector_bytes
        )

    @property
    def _direct(self) -> bool:
        """Every entry's vectors are stored as they are, in entry order (one full-precision tier)."""
        return self.codec is None and self.low is None

    @property
    def vector_bytes(self) -> int:
        """Bytes one stored key or value vector takes (codes, scale and zero when quantized)."""
        if self.codec is not None:
            return self.codec.vector_bytes
        return self.head_dim * self._vectors["keys"].element_size()

    @property
    def index_bytes(self) -> int:
        """Bytes of an entry's position (and tier slot)."""
        slot = 0 if self._slot is None else self._slot.element_size()
        return self._positions.element_size() + slot

    def entry_bytes(self) -> int:
        """Bytes of one entry in every buffer in entry order (a two-tier memory's vectors are not)."""
        return sum(t.element_size() * (t.shape[1] if t.dim() > 1 else 1) for t in self._rows())

    # ---- layout

    def _per_entry(self) -> list[torch.Tensor]:
        return [*([self._bias] if self._bias is not None else []), *self._state.values()]

    def _rows(self) -> list[torch.Tensor]:
        """Every buffer with a row per entry, in entry order."""
        if self.low is not None:
            return [self._positions, self._slot, *self._per_entry()]
        return [*self._vectors.values(), *self._params.values(), self._positions, *self._per_entry()]

    def _stores(self) -> list[torch.Tensor]:
        """A two-tier memory's vector stores (not in entry order)."""
        if self.low is None:
            return []
        return [*self._vectors.values(), *self._codes.values(), *self._params.values()]

    def _dense_room(self, flat: torch.Tensor) -> torch.Tensor:
        room = self.room[0] if self.room else 0
        return flat.view(*self.shape, room, *flat.shape[1:])

    def _entries(self) -> torch.Tensor:
        """Flat indices of every held entry, segment after segment."""
        return _ranges(self.offsets, self.lengths, self._positions.device)

    def _slots(self, new: int) -> torch.Tensor:
        """Flat indices where each segment's next ``new`` entries go, segment after segment."""
        ends = [start + length for start, length in zip(self.offsets, self.lengths, strict=True)]
        device = self._positions.device
        if new == 1:  # a decode step's append
            return torch.tensor(ends, device=device)
        # Equal counts: one broadcast sum in place of a range per segment.
        return (torch.tensor(ends, device=device)[:, None] + torch.arange(new, device=device)).flatten()

    def _grow(self, new: int) -> None:
        """Room for ``new`` more entries in every segment, and a quarter more (appends stay amortised
        O(1), and growing leaves at most a quarter of the buffers empty); uniform memories stay uniform."""
        if self.uniform:
            rooms = [_grown(self.room[0] if self.room else 0, self.length + new)] * self.segments
        else:
            rooms = [_grown(room, length + new) for length, room in zip(self.lengths, self.room, strict=True)]
        self._repack(self._entries(), self.lengths, rooms)

    def _repack(self, chosen: torch.Tensor, lengths: list[int], rooms: list[int] | None = None) -> None:
        """New buffers holding the flat entries ``chosen`` (segment after segment, ``lengths`` each)
        in segments of ``rooms`` (default: exactly the lengths)."""
        rooms = lengths if rooms is None else rooms
        total = sum(rooms)
        starts = _starts(rooms)
        destination = _ranges(starts, lengths, chosen.device)

        def moved(buffer: torch.Tensor) -> torch.Tensor:
            fresh = buffer.new_zeros(total, *buffer.shape[1:])
            fresh[destination] = buffer[chosen]
            return fresh

        if self.low is None:
            self._vectors = {kind: moved(buffer) for kind, buffer in self._vectors.items()}
            self._params = {kind: moved(buffer) for kind, buffer in self._params.items()}
        else:
            self._slot = moved(self._slot)
        self._positions = moved(self._positions)
        self._bias = None if self._bias is None else moved(self._bias)
        self._state = {name: moved(buffer) for name, buffer in self._state.items()}
        self._layout(lengths, rooms)
        if self.low is not None:
            self._compact_stores()

    def _layout(self, lengths: list[int], rooms: list[int]) -> None:
        self.lengths, self.room, self.offsets = list(lengths), list(rooms), _starts(rooms)


def _ranges(starts: Sequence[int], counts: Sequence[int], device: torch.device) -> torch.Tensor:
    """Flat indices ``start .. start + count - 1`` of each (start, count) pair, one after another."""
    if not starts:
        return torch.empty(0, dtype=torch.long, device=device)
    pairs = zip(starts, counts, strict=True)
    return torch.cat([torch.arange(start, start + count, device=device) for start, count in pairs])


def _grown(room: int, needed: int) -> int:
    return max(needed, room + max(room // 4, GROWTH_MIN))


def _starts(rooms: Sequence[int]) -> list[int]:
    starts, total = [], 0
    for room in rooms:
        starts.append(total)
        total += room
    return starts


class KVMemory:
    """All layers' memory plus what is shared: the sink count and how many tokens have been seen."""

    def __init__(
        self,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        *,
        sinks: int = 4,
        batch: int = 1,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        kv_bits: int | None = None,
        low_bits: int | None = None,
    ) -> None:
        device = torch.device(device)
        self.kv_bits, self.low_bits = kv_bits, low_bits
        codec = None if kv_bits is None else KVCodec(kv_bits, head_dim)
        low = None if low_bits is None else KVCodec(low_bits, head_dim)
        self.layers = [
            LayerMemory(batch, kv_heads, head_dim, dtype, device, codec, low) for _ in range(num_layers)
        ]
        self.sinks = sinks
        self.seen = 0  # tokens fed so far, i.e. the original position of the next one

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    def trim(self) -> None:
        """Every layer's ``trim``."""
        for layer in self.layers:
            layer.trim()

    def held_bytes(self) -> int:
        """Bytes of the entries held, without the room kept for more."""
        return sum(layer.held_bytes() for layer in self.layers)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every layer's entries by name (``"3.keys"``, ``"3.state.h2o_mass"``...), to save the memory."""
        return {
            f"{index}.{name}": tensor.contiguous()
            for index, layer in enumerate(self.layers)
            for name, tensor in layer.snapshot().items()
        }

    def load_tensors(self, tensors: dict[str, torch.Tensor], *, seen: int) -> None:
        """Hold the entries ``tensors`` names (from ``tensors()`` of a memory of the same shape)."""
        for index, layer in enumerate(self.layers):
            prefix = f"{index}."
            layer.restore(
                {key.removeprefix(prefix): value for key, value in tensors.items() if key.startswith(prefix)}
            )
        self.seen = seen

    def rollback_point(self, *, appending_only: bool) -> Callable[[], None]:
        """A function that puts the memory back as it is now. When what follows only appends (no
        eviction, no state update), forgetting the new entries is enough; otherwise every layer's
        entries are copied now (what a cancelled compressing turn costs)."""
        seen, lengths = self.seen, [list(layer.lengths) for layer in self.layers]
        saved = None if appending_only else [layer.snapshot() for layer in self.layers]

        @torch.inference_mode()
        def restore() -> None:
            self.seen = seen
            for index, layer in enumerate(self.layers):
                if saved is None:
                    layer.truncate(lengths[index])
                else:
                    layer.restore(saved[index])

        return restore

    def bytes_per_token(self, states: int = 0, *, low: bool = False) -> int:
        """Bytes one more token takes over all layers and KV heads, with ``states`` policy states;
        ``low``: once demoted to the low tier of a two-tier memory."""
        layer = self.layers[0]
        batch, kv_heads = layer.shape
        vector = layer.low.vector_bytes if low else layer.vector_bytes
        per_head = len(KINDS) * vector + layer.index_bytes + 4 * states
        return len(self.layers) * batch * kv_heads * per_head

    @property
    def longest(self) -> int:
        """Entries of the longest head of any layer, sinks included."""
        return max((layer.length for layer in self.layers), default=0)

    @property
    def uniform(self) -> bool:
        """Every KV head of a layer holds as many entries as the others."""
        return all(layer.uniform for layer in self.layers)

    def kept(self) -> int:
        """Tokens held beyond the sinks per KV head: the most of any layer, a layer's count being the
        mean of its heads' (rounded up; every head's when they hold the same number)."""
        mean = max((-(-sum(layer.lengths) // layer.segments) for layer in self.layers), default=0)
        return mean - min(self.sinks, self.seen)
