"""The reference backend: plain PyTorch in float32, the oracle every other backend is tested against.

It is written to be obviously right, not fast: scores are materialised, one tile of query rows at a
time so that memory stays bounded by ``ROW_TILE x Lk`` per head. KV heads of different lengths
(``Segments``) are attended one head at a time, each with its own causal alignment.
"""

from __future__ import annotations

import torch

from backends import AttentionOutput, AttentionSpec, Backend, Distant, KeyStats, Segments, register

ROW_TILE = 512


# Masks made by ``visible``, one per (rows, window, device), and the most elements they may hold.
_MASKS: dict[tuple[int, int | None, str], torch.Tensor] = {}
MASK_ELEMENTS = 1 << 25


def visible(lq: int, lk: int, window: int | None, device: torch.device | str = "cpu") -> torch.Tensor:
    """[lq, lk] bool: which keys each query row may attend to (see the contract in ``backends``).
    Read-only, as it may be a view of a kept mask: the diagonal being aligned bottom-right, the mask
    for ``lk`` keys is the last ``lk`` columns of the mask for any more keys, so the one kept mask of
    a chunk's rows serves every KV head's segment, every layer and the statistics' row tiles."""
    key = (lq, window, str(device))
    mask = _MASKS.get(key)
    if mask is None or mask.shape[1] < lk:
        query_at = torch.arange(lq, device=device)[:, None] + (lk - lq)
        key_at = torch.arange(lk, device=device)[None, :]
        mask = key_at <= query_at
        if window is not None:
            mask &= query_at - key_at < window
        if sum(kept.numel() for kept in _MASKS.values()) + mask.numel() > MASK_ELEMENTS:
            _MASKS.clear()
        if mask.numel() <= MASK_ELEMENTS:
            _MASKS[key] = mask
    return mask[:, mask.shape[1] - lk :]


def _grouped_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    rows: slice,
    scale: float,
    window: int | None,
    bias: torch.Tensor | None,
    distant: Distant | None = None,
) -> torch.Tensor:
    """Masked, scaled, biased float32 scores [B, Hkv, G, rows, Lk] for query rows ``rows``, distant
    keys' scores taken against ``distant.keys``."""
    batch, q_heads, lq, dim = q.shape
    kv_heads, lk = k.shape[1], k.shape[2]
    grouped = q[:, :, rows].float().reshape(batch, kv_heads, q_heads // kv_heads, -1, dim)
    scores = grouped @ k.float()[:, :, None].transpose(-1, -2) * scale
    if distant is not None:
        shared = grouped @ distant.keys.float()[:, :, None].transpose(-1, -2) * scale
        scores = torch.where(distant.mask(rows), shared, scores)
    if bias is not None:
        scores = scores + bias.float()[:, :, None, None, :]
    mask = visible(lq, lk, window, q.device)[rows]
    return scores.masked_fill(~mask, float("-inf"))


def _probabilities(scores: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    # exp(-inf - -inf) is NaN on rows that see no key; such rows carry no probability.
    return torch.exp(scores - lse[..., None]).nan_to_num(0.0)


def _default_scale(q: torch.Tensor, scale: float | None) -> float:
    return q.shape[-1] ** -0.5 if scale is None else scale


def _write(result: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return result
    out.copy_(result)
    return out


def per_segment(q: torch.Tensor, segments: Segments, attend) -> list:
    """``attend(q_group [1, G, Lq, D], k [1, 1, n, D], v [1, 1, n, D], bias [1, 1, n] | None)`` for
    each segment, in order: the queries of its KV head's group against its own entries."""
    batch, kv_heads = segments.shape
    group = q.shape[1] // kv_heads
    results = []
    for s in range(batch * kv_heads):
        b, h = divmod(s, kv_heads)
        keys, values, bias = segments[s]
        results.append(
            attend(
                q[b : b + 1, h * group : (h + 1) * group], keys[None, None], values[None, None],
                None if bias is None else bias[None, None],
            )
        )  # fmt: skip
    return results


class ReferenceBackend(Backend):
    name = "reference"

    def lacks(self, spec: AttentionSpec) -> str | None:
        if spec.distant and (spec.segments or spec.bias):
            return "distant keys shared across layers are read on memories of equal heads, unbiased"
        return None

    def prefill(
        self, q, k, v, *, scale=None, window=None, out=None, bias=None, distant=None
    ) -> AttentionOutput:
        if isinstance(k, Segments):
            parts = per_segment(
                q, k, lambda qs, ks, vs, bs: self.prefill(qs, ks, vs, scale=scale, window=window, bias=bs)
            )
            result = torch.cat([part.out for part in parts], dim=1).reshape(q.shape)
            lse = None  # a subclass's fast path may not give one
            if parts[0].lse is not None:
                lse = torch.cat([part.lse for part in parts], dim=1).reshape(q.shape[:3])
            return AttentionOutput(_write(result, out), lse)
        batch, q_heads, lq, dim = q.shape
        kv_heads = k.shape[1]
        scale = _default_scale(q, scale)
        result = torch.empty(
            batch, kv_heads, q_heads // kv_heads, lq, dim, dtype=torch.float32, device=q.device
        )
        lse = torch.empty(batch, kv_heads, q_heads // kv_heads, lq, dtype=torch.float32, device=q.device)
        values = v.float()[:, :, None]
        for start in range(0, lq, ROW_TILE):
            rows = slice(start, min(lq, start + ROW_TILE))
            scores = _grouped_scores(q, k, rows, scale, window, bias, distant)
            lse[..., rows] = torch.logsumexp(scores, dim=-1)
            result[..., rows, :] = _probabilities(scores, lse[..., rows]) @ values
        result = result.reshape(batch, q_heads, lq, dim).to(q.dtype)
        return AttentionOutput(_write(result, out), lse.reshape(batch, q_heads, lq))

    def scores(
        self, q, k, *, lse=None, last=None, scale=None, window=None, out=None, bias=None, by_query_head=False
    ) -> KeyStats:
        if isinstance(k, Segments):
            stats = self._segment_scores(q, k, lse, last, scale, window, by_query_head)
            return KeyStats(_write(stats.mass, out), stats.count)
        batch, q_heads, lq, _ = q.shape
        kv_heads, lk = k.shape[1], k.shape[2]
        scale = _default_scale(q, scale)
        first = 0 if last is None else max(0, lq - last)
        group = q_heads // kv_heads
        mass = torch.zeros(batch, kv_heads, group if by_query_head else 1, lk, device=q.device)
        grouped_lse = None if lse is None else lse.float().reshape(batch, kv_heads, group, lq)
        for start in range(first, lq, ROW_TILE):
            rows = slice(start, min(lq, start + ROW_TILE))
            scores = _grouped_scores(q, k, rows, scale, window, bias)
            row_lse = torch.logsumexp(scores, dim=-1) if grouped_lse is None else grouped_lse[..., rows]
            per_head = _probabilities(scores, row_lse).sum(dim=3)  # [B, Hkv, G, Lk]
            mass += per_head if by_query_head else per_head.sum(dim=2, keepdim=True)
        count = visible(lq, lk, window, q.device)[first:].sum(dim=0)
        mass = mass.reshape(batch, q_heads if by_query_head else kv_heads, lk)
        return KeyStats(_write(mass, out), count)

    def _segment_scores(self, q, segments: Segments, lse, last, scale, window, by_query_head) -> KeyStats:
        """Each segment's statistics, left-padded to the longest (as policies see candidates)."""
        batch, kv_heads = segments.shape
        group, longest = q.shape[1] // kv_heads, segments.longest
        rows = group if by_query_head else 1
        mass = torch.zeros(batch, kv_heads, rows, longest, dtype=torch.float32, device=q.device)
        count = torch.zeros(batch, kv_heads, longest, dtype=torch.long, device=q.device)
        for s in range(batch * kv_heads):
            b, h = divmod(s, kv_heads)
            heads = slice(h * group, (h + 1) * group)
            keys, _, bias = segments[s]
            stats = self.scores(
                q[b : b + 1, heads], keys[None, None], last=last, scale=scale, window=window,
                lse=None if lse is None else lse[b : b + 1, heads],
                bias=None if bias is None else bias[None, None], by_query_head=by_query_head,
            )  # fmt: skip
            n = segments.lengths[s]
            mass[b, h, :, longest - n :] = stats.mass[0]
            count[b, h, longest - n :] = stats.count
        return KeyStats(mass.reshape(batch, kv_heads * rows, longest), count)

    def decode(
        self, q, k, v, *, scale=None, window=None, out=None, bias=None, distant=None
    ) -> AttentionOutput:
        return self.prefill(q, k, v, scale=scale, window=window, out=out, bias=bias, distant=distant)


register("reference")(ReferenceBackend)
