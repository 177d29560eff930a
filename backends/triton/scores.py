"""Per-key attention mass: how much softmax probability each key receives from the scored queries.

One program owns ``BLOCK_N`` keys of one KV head. It recomputes QKᵀ for every query head of that
KV group and every scored query row that can see one of its keys, turns the scores into
probabilities with the rows' LSE from the forward pass, and sums them down the columns in a
float32 register vector. Each key's total is written once: no atomics, the same bits every run,
and no attention matrix in memory.

KV heads of different lengths (``RAGGED``) are read in place from their flat buffers; their masses
come out right-aligned in a [B, Hkv, longest] tensor, so a program owns ``BLOCK_N`` output columns,
and columns left of a shorter segment's first key (which no query sees) get 0. Entries may carry a
logit bias (``HAS_BIAS``), added to the scaled score of its key.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from backends.triton.runtime import (
    INTERPRETED,
    LOG2E,
    LOG2E_IN_KERNEL,
    Memory,
    autotune,
    dot_precision,
    launch_config,
    length_bucket,
    segment_span,
    tile_bytes,
)


def _shared_memory(config: triton.Config, args: dict) -> int:
    head_dim, stages = args["HEAD_DIM"], max(config.num_stages, 1)
    block_m, block_n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    return tile_bytes(args, "k_ptr", block_n, head_dim) + stages * tile_bytes(
        args, "q_ptr", block_m, head_dim
    )


_GPU_CONFIGS = [
    launch_config(64, 128, 8, 3),
    launch_config(64, 64, 4, 3),
    launch_config(128, 64, 8, 2),
    launch_config(32, 128, 4, 3),
    launch_config(32, 32, 4, 1),  # float32 at head dim 256 fits nothing larger
]


@autotune(
    _GPU_CONFIGS,
    launch_config(64, 64, 1, 1),
    key=["HEAD_DIM", "q_len_bucket", "k_len_bucket", "WINDOWED", "HAS_BIAS", "RAGGED", "PER_QUERY_HEAD"],
    shared_memory=_shared_memory,
)
@triton.jit(do_not_specialize=["q_len", "k_len", "window", "q_len_bucket", "k_len_bucket"])
def _key_mass_kernel(
    k_ptr,
    v_ptr,  # unused: the memory's arguments come as a whole
    bias_ptr,
    offsets_ptr,
    lengths_ptr,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_bb,
    stride_bh,
    stride_bn,
    q_ptr,
    lse_ptr,
    mass_ptr,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_lb,
    stride_lh,
    stride_lm,
    stride_mb,
    stride_mh,
    stride_mn,
    kv_heads,
    group,
    q_len,
    k_len,
    window,
    qk_scale,
    q_len_bucket,
    k_len_bucket,
    HEAD_DIM: tl.constexpr,
    WINDOWED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RAGGED: tl.constexpr,
    PER_QUERY_HEAD: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    block = tl.program_id(0)
    batch = tl.program_id(1) // kv_heads
    kv_head = tl.program_id(1) % kv_heads
    # Output columns [0, k_len) are the keys of the longest segment; this one's n keys fill the last n.
    first, n = 0, k_len
    if RAGGED:
        first, n = segment_span(offsets_ptr, lengths_ptr, tl.program_id(1))
    pad = k_len - n
    columns = block * BLOCK_N + tl.arange(0, BLOCK_N)
    keys = columns - pad
    real_keys = keys < n
    if RAGGED:
        real_keys = real_keys & (keys >= 0)
    dims = tl.arange(0, HEAD_DIM)
    offset = n - q_len

    b64, h64 = batch.to(tl.int64), kv_head.to(tl.int64)
    k_base = k_ptr + b64 * stride_kb + h64 * stride_kh + first * stride_kn
    k_ptrs = k_base + keys.to(tl.int64)[None, :] * stride_kn + dims[:, None] * stride_kd
    k = tl.load(k_ptrs, mask=real_keys[None, :], other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
    if HAS_BIAS:
        bias_base = bias_ptr + b64 * stride_bb + h64 * stride_bh + first * stride_bn
        bias = tl.load(bias_base + keys.to(tl.int64) * stride_bn, mask=real_keys, other=0.0)
        bias = bias.to(tl.float32) * LOG2E_IN_KERNEL

    # Query rows that see at least one of this block's keys: at or after the first key, and
    # (with a window) less than ``window`` after the last one. A block of padding columns alone
    # (last_key < first_key) has none.
    first_key = tl.maximum(block * BLOCK_N - pad, 0)
    last_key = tl.minimum(block * BLOCK_N + BLOCK_N - pad, n) - 1
    row_lo = tl.maximum(first_key - offset, 0)
    row_hi = tl.minimum(last_key + window - offset, q_len) if WINDOWED else q_len
    if RAGGED:
        row_hi = tl.where(last_key >= first_key, row_hi, row_lo)

    total = tl.zeros([BLOCK_N], tl.float32)
    for member in range(group):
        mass = tl.zeros([BLOCK_N], tl.float32)
        head = (kv_head * group + member).to(tl.int64)
        q_base = q_ptr + batch.to(tl.int64) * stride_qb + head * stride_qh
        lse_base = lse_ptr + batch.to(tl.int64) * stride_lb + head * stride_lh
        for start_m in range(row_lo, row_hi, BLOCK_M):
            rows = start_m + tl.arange(0, BLOCK_M)
            real = rows < row_hi
            q_ptrs = q_base + rows.to(tl.int64)[:, None] * stride_qm + dims[None, :] * stride_qd
            q = tl.load(q_ptrs, mask=real[:, None], other=0.0)
            if UPCAST:
                q = q.to(tl.float32)
            lse = tl.load(lse_base + rows.to(tl.int64) * stride_lm, mask=real, other=0.0) * LOG2E_IN_KERNEL
            scores = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
            if HAS_BIAS:
                scores += bias[None, :]
            # Keys past n are never seen: a real row's position is at most n - 1.
            rows_at = rows + offset
            seen = (keys[None, :] <= rows_at[:, None]) & real[:, None]
            if RAGGED:
                seen = seen & real_keys[None, :]
            if WINDOWED:
                seen = seen & (rows_at[:, None] - keys[None, :] < window)
            mass += tl.sum(tl.where(seen, tl.math.exp2(scores - lse[:, None]), 0.0), 0)
        if PER_QUERY_HEAD:
            mass_base = mass_ptr + batch.to(tl.int64) * stride_mb + head * stride_mh
            tl.store(mass_base + columns.to(tl.int64) * stride_mn, mass, mask=columns < k_len)
        else:
            total += mass

    if not PER_QUERY_HEAD:
        mass_base = mass_ptr + batch.to(tl.int64) * stride_mb + kv_head.to(tl.int64) * stride_mh
        tl.store(mass_base + columns.to(tl.int64) * stride_mn, total, mask=columns < k_len)


def key_mass(
    q: torch.Tensor,
    memory: Memory,
    lse: torch.Tensor,
    scale: float,
    window: int | None,
    out: torch.Tensor | None,
    by_query_head: bool = False,
) -> torch.Tensor:
    """Float32 mass [B, Hkv, longest] summed over every row of ``q`` (whose float32 natural-log row
    LSE is ``lse`` [B, Hq, Lq]) and over each KV group's query heads (per query head [B, Hq, longest]
    ``by_query_head``), each segment right-aligned and left-padded with zeros; into ``out`` when given.

    Scoring the last w rows is scoring ``q[:, :, -w:]`` with ``lse[..., -w:]``: the causal diagonal is
    aligned bottom-right, so dropping leading rows moves no row's position.
    """
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, k_len = memory.shape[1], memory.longest
    rows = q_heads if by_query_head else kv_heads
    mass = torch.empty(batch, rows, k_len, dtype=torch.float32, device=q.device) if out is None else out
    if k_len == 0 or batch * kv_heads == 0:
        return mass
    if q_len == 0:
        return mass.zero_()

    def grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(k_len, meta["BLOCK_N"]), batch * kv_heads

    _key_mass_kernel[grid](
        *memory.pointers(), q, lse, mass, *q.stride(), *lse.stride(), *mass.stride(),
        kv_heads, q_heads // kv_heads, q_len, k_len, window or 0, scale * LOG2E,
        length_bucket(q_len), length_bucket(k_len),
        HEAD_DIM=head_dim,
        WINDOWED=window is not None,
        HAS_BIAS=memory.has_bias,
        RAGGED=memory.ragged,
        PER_QUERY_HEAD=by_query_head,
        UPCAST=INTERPRETED,
        DOT_PRECISION=dot_precision(q.dtype),
    )  # fmt: skip
    return mass
