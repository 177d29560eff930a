"""PyTorch's fused ``scaled_dot_product_attention`` for the attention output.

SDPA returns no LSE, so this backend's statistics recompute the scores of just the rows a policy
scores: cheap for a last-``w`` window, a full recomputation for "all queries", done as one batched
product and a fused softmax per tile of rows (the reference spells each step out instead). It is the
fast path on the CPU (6-10x the explicit float32 math there).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from backends import AttentionOutput, KeyStats, Segments, register
from backends.reference import ROW_TILE, ReferenceBackend, _default_scale, _write, visible


class SdpaBackend(ReferenceBackend):
    name = "sdpa"

    def prefill(
        self, q, k, v, *, scale=None, window=None, out=None, bias=None, distant=None
    ) -> AttentionOutput:
        # Each segment comes back here as a plain tensor; two key sources need the scores built.
        if isinstance(k, Segments) or distant is not None:
            return super().prefill(q, k, v, scale=scale, window=window, out=out, bias=bias, distant=distant)
        lq, lk = q.shape[2], k.shape[2]
        if bias is not None:
            # A float mask adds to the scores: the bias, and -inf where a key is not visible.
            mask = (
                bias[:, :, None, None, :]
                .to(q.dtype)
                .masked_fill(~visible(lq, lk, window, q.device), float("-inf"))
            )
            mask = mask.repeat_interleave(q.shape[1] // k.shape[1], dim=1).flatten(1, 2)
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
        if isinstance(k, Segments) or bias is not None or distant is not None or q.dtype != torch.bfloat16:
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


register("sdpa")(SdpaBackend)
