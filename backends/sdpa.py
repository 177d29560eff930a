"""PyTorch's fused ``scaled_dot_product_attention`` for the attention output.

SDPA returns no LSE, so this backend's statistics recompute the scores of just the rows a policy
scores: cheap for a last-``w`` window, a full recomputation for "all queries", done as one batched
product and a fused softmax per tile of rows (the reference spells each step out instead). It is the
fast path on the CPU (6-10x the explicit float32 math there).

POD's two key sources (``Distant``) take fused passes over contiguous blocks of columns per tile of
query rows: the sinks and the proximal band over the own keys, the distant span over the shared keys,
and only the diagonal blocks, where the source or visibility changes row by row, with a mask; merged
by their LSE into the one softmax over both. The blocks are views and together cost about one pass
over the keys each row sees; a decode row needs no mask at all. The fused kernel that returns an LSE
is PyTorch's CPU flash attention; elsewhere the reference's scores are built instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from backends import AttentionOutput, Distant, KeyStats, Segments, register
from backends.reference import ROW_TILE, ReferenceBackend, _default_scale, _write, visible


class SdpaBackend(ReferenceBackend):
    name = "sdpa"

    def prefill(
        self, q, k, v, *, scale=None, window=None, out=None, bias=None, distant=None
    ) -> AttentionOutput:
        if distant is not None and _FLASH_WITH_LSE is not None and q.device.type == "cpu" and bias is None:
            return _two_sources(q, k, v, distant, _default_scale(q, scale), window, out)
        # Each segment comes back here as a plain tensor.
        if isinstance(k, Segments) or distant is not None:
            return super().prefill(q, k, v, scale=scale, window=window, out=out, bias=bias, distant=distant)
        lq, lk = q.shape[2], k.shape[2]
        kv_heads, group = k.shape[1], q.shape[1] // k.shape[1]
        if bias is not None and kv_heads > 1 and group > 1 and lq > 1:
            # One call per KV head, whose mask broadcasts over its group: one call for all would
            # need the [Lq, Lk] mask copied for every query head (a chunk's, tens of MB per layer).
            parts = [
                self.prefill(q[:, h * group : (h + 1) * group], k[:, h : h + 1], v[:, h : h + 1],
                             scale=scale, window=window, bias=bias[:, h : h + 1]).out
                for h in range(kv_heads)
            ]  # fmt: skip
            return AttentionOutput(_write(torch.cat(parts, dim=1), out), None)
        if bias is not None:
            # A float mask adds to the scores: the bias, and -inf where a key is not visible (a
            # decode row without a window sees every key).
            mask = bias[:, :, None, None, :].to(q.dtype)
            if lq > 1 or window is not None:
                mask = mask.masked_fill(~visible(lq, lk, window, q.device), float("-inf"))
            if lq == 1 and group > 1:  # a decode row's mask is small: one call for all heads
                mask = mask.expand(-1, -1, group, -1, -1)
            mask = mask.flatten(1, 2)
            causal = False
        elif window is None and lq == lk:
            mask, causal = None, True
        elif window is None and lq == 1:
            mask, causal = None, False
        else:
            mask, causal = visible(lq, lk, window, q.device), False
        result = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
        )
        return AttentionOutput(_write(result, out), None)

    def scores(
        self, q, k, *, lse=None, last=None, scale=None, window=None, out=None, bias=None, by_query_head=False
    ) -> KeyStats:
        if isinstance(k, Segments):  # each segment comes back here as a plain tensor
            return super().scores(
                q, k, lse=lse, last=last, scale=scale, window=window, out=out, by_query_head=by_query_head
            )
        batch, q_heads, lq, dim = q.shape
        kv_heads, lk = k.shape[1], k.shape[2]
        group = q_heads // kv_heads
        first = 0 if last is None else max(0, lq - last)
        scale = _default_scale(q, scale)
        mass = torch.zeros(batch, kv_heads, group if by_query_head else 1, lk, device=q.device)
        keys = k.float().flatten(0, 1).transpose(1, 2)  # [B*Hkv, D, Lk]
        for start in range(first, lq, ROW_TILE):
            rows = min(lq, start + ROW_TILE) - start
            grouped = (q[:, :, start : start + rows].float() * scale).reshape(batch * kv_heads, -1, dim)
            scores = torch.bmm(grouped, keys).view(batch, kv_heads, group, rows, lk)
            if bias is not None:
                scores += bias.float()[:, :, None, None, :]
            # Rows see every key up to their own position: only the newest ``rows`` columns (or a
            # window) need masking, and every row sees at least itself.
            if window is not None or rows > 1:
                scores.masked_fill_(~visible(lq, lk, window, q.device)[start : start + rows], float("-inf"))
            if lse is None:
                probabilities = torch.softmax(scores, dim=-1)
            else:
                row_lse = lse.float().reshape(batch, kv_heads, group, lq)[..., start : start + rows]
                probabilities = torch.exp(scores - row_lse[..., None])
            per_head = probabilities.sum(dim=3)
            mass += per_head if by_query_head else per_head.sum(dim=2, keepdim=True)
        count = visible(lq, lk, window, q.device)[first:].sum(dim=0)
        mass = mass.reshape(batch, q_heads if by_query_head else kv_heads, lk)
        return KeyStats(_write(mass, out), count)

    def decode(
        self, q, k, v, *, scale=None, window=None, out=None, bias=None, distant=None
    ) -> AttentionOutput:
        if isinstance(k, Segments):  # never with ``distant``: ``lacks`` declines that
            return AttentionOutput(_write(_ragged_decode(q, k, _default_scale(q, scale), window), out), None)
        if bias is not None or distant is not None or q.dtype != torch.bfloat16:
            return self.prefill(q, k, v, scale=scale, window=window, out=out, bias=bias, distant=distant)
        # One bfloat16 row: the fused kernel is slow there (25x at 8k keys); two grouped products in
        # bfloat16 with a float32 softmax are faster than even float32 SDPA.
        if window is not None:
            k, v = k[:, :, -window:], v[:, :, -window:]
        batch, q_heads, _, dim = q.shape
        kv_heads = k.shape[1]
        # [B*Hkv, ...] batches: a view even of the memory's strided slices, where 4-d matmul copies.
        grouped = q.reshape(batch * kv_heads, q_heads // kv_heads, dim)
        keys, values = k.flatten(0, 1), v.flatten(0, 1)
        scores = torch.bmm(grouped, keys.transpose(1, 2)).float() * _default_scale(q, scale)
        result = torch.bmm(scores.softmax(dim=-1).to(v.dtype), values).reshape(batch, q_heads, 1, dim)
        return AttentionOutput(_write(result, out), None)


def _ragged_decode(q: torch.Tensor, segments: Segments, scale: float, window: int | None) -> torch.Tensor:
    """A decode row of every query head against KV heads of different lengths, read in place from
    the flat buffers: per segment, two small products and a float32 softmax. At one row these cost
    less than the fused kernel's dispatch, which a call per segment would pay each time; the few
    operations are the cost here (each is about as dear as its arithmetic), so the scale is applied
    to the queries once, segments are walked by ``unbind`` and each product writes into the result."""
    batch, kv_heads = segments.shape
    group, dim = q.shape[1] // kv_heads, q.shape[-1]
    rows = (q * scale).reshape(batch * kv_heads, group, dim).unbind()
    result = torch.empty(batch * kv_heads, group, dim, dtype=q.dtype, device=q.device)
    each = zip(rows, result.unbind(), segments.offsets, segments.lengths, strict=True)
    for row, into, offset, length in each:
        first, end = offset + (0 if window is None else max(0, length - window)), offset + length
        scores = F.linear(row, segments.keys[first:end])
        if segments.bias is not None:
            scores = scores.float() + segments.bias[first:end]
        values = segments.values[first:end]
        torch.mm(torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype), values, out=into)
    return result.view(q.shape)


_FLASH_WITH_LSE = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _two_sources(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, distant: Distant, scale: float, window: int | None,
    out: torch.Tensor | None,
) -> AttentionOutput:  # fmt: skip
    """POD's attention by fused passes over blocks of columns per tile of rows (see the module's
    docstring); the keys' positions ascend, as in the uncompressed memory POD reads."""
    batch, q_heads, lq, dim = q.shape
    kv_heads, lk = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    positions = distant.key_positions
    sinks = int((positions < distant.initial).sum())  # memory order is position order: sinks first
    result = torch.empty_like(q)
    lse = torch.empty(batch, q_heads, lq, dtype=torch.float32, device=q.device)
    seen_by_all = visible(lq, lk, window, q.device)
    for start in range(0, lq, ROW_TILE):
        rows = slice(start, min(lq, start + ROW_TILE))
        count = rows.stop - rows.start
        at = distant.query_positions[rows]
        seen = seen_by_all[rows]
        far = seen & distant.mask(rows)
        near = seen & ~far
        queries = q[:, :, rows].reshape(batch, kv_heads, group * count, dim)
        parts = [
            _pass(queries, keys[:, :, columns], v[:, :, columns], allowed, group, scale)
            for keys, columns, allowed in _blocks(
                k, distant.keys, near, far, positions, sinks, at, distant.recent
            )
        ]
        outputs, lses = zip(*parts, strict=True)
        top = torch.stack(lses).amax(dim=0)
        weights = [torch.exp(part - top) for part in lses]
        total = sum(weights)
        merged = (
            sum(w[..., None] * o.float() for w, o in zip(weights, outputs, strict=True)) / total[..., None]
        )
        result[:, :, rows] = merged.reshape(batch, q_heads, count, dim).to(q.dtype)
        lse[:, :, rows] = (top + total.log()).view(batch, q_heads, count)
    return AttentionOutput(_write(result, out), lse)


def _blocks(
    own: torch.Tensor, shared: torch.Tensor, near: torch.Tensor, far: torch.Tensor, positions: torch.Tensor,
    sinks: int, at: torch.Tensor, recent: int,
) -> list[tuple[torch.Tensor, slice, torch.Tensor | None]]:  # fmt: skip
    """The column blocks a tile of rows at positions ``at`` reads, as (keys, columns, mask or None
    where every row sees every column): the sinks; the distant span every row reads whole; the span
    where the key source turns from shared to own row by row (read from both, masked); the proximal
    band; the tile's own causal block. Contiguous columns, so each pass reads views and only the
    diagonal blocks build a mask; adjacent unmasked blocks of the same keys are read as one."""

    def column(position: int) -> int:
        return int(torch.searchsorted(positions, position))

    turns = max(sinks, column(int(at.min()) - recent + 1))
    proximal = max(turns, column(int(at.max()) - recent + 1))
    causal = max(proximal, column(int(at.min())))
    end = max(causal, column(int(at.max()) + 1))  # later keys are the tile's future
    wanted = [
        (own, near, 0, sinks), (shared, far, sinks, turns), (shared, far, turns, proximal),
        (own, near, turns, proximal), (own, near, proximal, causal), (own, near, causal, end),
    ]  # fmt: skip
    blocks: list[tuple[torch.Tensor, slice, torch.Tensor | None]] = []
    for keys, allowed, first, stop in wanted:
        mask = allowed[:, first:stop]
        if stop <= first or not mask.any():
            continue
        mask = None if mask.all() else mask
        if (
            blocks
            and mask is None
            and blocks[-1][0] is keys
            and blocks[-1][2] is None
            and blocks[-1][1].stop == first
        ):
            blocks[-1] = (keys, slice(blocks[-1][1].start, stop), None)
        else:
            blocks.append((keys, slice(first, stop), mask))
    return blocks


def _pass(queries, keys, values, mask, group, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused attention of ``queries`` [B, Hkv, G*rows, D] (a group's heads as rows) over ``keys``/
    ``values``, where ``mask`` [rows, columns] allows (None: everywhere); rows that see none of them
    get LSE -inf (the kernel reports 0)."""
    if mask is None:
        output, lse = _FLASH_WITH_LSE(queries, keys, values, 0.0, False, scale=scale)
        return output, lse.float()
    allowed = mask.repeat(group, 1)
    bias = torch.zeros(allowed.shape, dtype=queries.dtype, device=queries.device).masked_fill_(
        ~allowed, float("-inf")
    )
    output, lse = _FLASH_WITH_LSE(queries, keys, values, 0.0, False, attn_mask=bias, scale=scale)
    return output, lse.float().masked_fill(~allowed.any(dim=-1), float("-inf"))


register("sdpa")(SdpaBackend)
