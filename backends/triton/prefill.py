"""FlashAttention-2 forward of a chunk's queries against memory + chunk keys, with the per-row LSE.

One program owns ``BLOCK_M`` query rows of one query head and streams that head's KV head in
``BLOCK_N`` key blocks with an online softmax in base 2. Key blocks outside the causal/window band of
its rows are never visited; blocks every row sees entirely run without a mask, only the blocks on
the band's edges pay for one. The LSE is kept in float32 and stored in natural log. Without values
the same kernel yields the LSE alone (what the score kernel needs when no prefill ran before it).

KV heads of different lengths (``RAGGED``) are read in place from their flat buffers: each program
looks up its segment's first entry and length and aligns its rows to that length. Entries may carry
a logit bias (``HAS_BIAS``), added to the scaled score of its key.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from backends.triton.runtime import (
    INTERPRETED,
    LN2_IN_KERNEL,
    LOG2E,
    LOG2E_IN_KERNEL,
    Memory,
    autotune,
    dot_precision,
    launch_config,
    length_bucket,
    rounded_to,
    segment_span,
    tile_bytes,
)


def _shared_memory(config: triton.Config, args: dict) -> int:
    head_dim, stages = args["HEAD_DIM"], max(config.num_stages, 1)
    block_m, block_n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    return tile_bytes(args, "q_ptr", block_m, head_dim) + 2 * stages * tile_bytes(
        args, "k_ptr", block_n, head_dim
    )


_GPU_CONFIGS = [
    launch_config(128, 64, 8, 3),
    launch_config(128, 32, 4, 3),
    launch_config(64, 64, 4, 3),
    launch_config(64, 32, 4, 2),
    launch_config(32, 32, 4, 1),  # float32 at head dim 256 fits nothing larger
]


@triton.jit
def _attend_blocks(
    acc,
    l_i,
    m_i,
    q,
    rows_at,
    k_base,
    v_base,
    bias_base,
    stride_kn,
    stride_kd,
    stride_vn,
    stride_vd,
    stride_bn,
    start,
    end,
    k_len,
    window,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    WINDOWED: tl.constexpr,
    WITH_VALUES: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    dims = tl.arange(0, HEAD_DIM)
    for start_n in range(start, end, BLOCK_N):
        keys = start_n + tl.arange(0, BLOCK_N)
        key_offsets = keys.to(tl.int64)
        k_ptrs = k_base + key_offsets[None, :] * stride_kn + dims[:, None] * stride_kd
        k = tl.load(k_ptrs, mask=keys[None, :] < k_len, other=0.0) if MASKED else tl.load(k_ptrs)
        if UPCAST:
            k = k.to(tl.float32)
        scores = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
        if HAS_BIAS:
            b_ptrs = bias_base + key_offsets * stride_bn
            bias = tl.load(b_ptrs, mask=keys < k_len, other=0.0) if MASKED else tl.load(b_ptrs)
            scores += bias.to(tl.float32)[None, :] * LOG2E_IN_KERNEL
        if MASKED:
            # Padding rows past the chunk sit beyond the last key, hence the explicit k_len test.
            seen = (keys[None, :] <= rows_at[:, None]) & (keys[None, :] < k_len)
            if WINDOWED:
                seen = seen & (rows_at[:, None] - keys[None, :] < window)
            scores = tl.where(seen, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        shift = m_new
        if MASKED:
            # A row that has seen no key yet keeps max -inf; shifting by 0 avoids -inf - -inf.
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(scores - shift[:, None])
        alpha = tl.math.exp2(m_i - shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        if WITH_VALUES:
            v_ptrs = v_base + key_offsets[:, None] * stride_vn + dims[None, :] * stride_vd
            v = tl.load(v_ptrs, mask=keys[:, None] < k_len, other=0.0) if MASKED else tl.load(v_ptrs)
            if UPCAST:
                v = v.to(tl.float32)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@autotune(
    _GPU_CONFIGS,
    launch_config(64, 32, 1, 1),
    key=["HEAD_DIM", "q_len_bucket", "k_len_bucket", "WINDOWED", "WITH_VALUES", "HAS_BIAS", "RAGGED"],
    shared_memory=_shared_memory,
)
@triton.jit(do_not_specialize=["q_len", "k_len", "window", "q_len_bucket", "k_len_bucket"])
def _prefill_kernel(
    k_ptr,
    v_ptr,
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
    out_ptr,
    lse_ptr,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_ob,
    stride_oh,
    stride_om,
    stride_od,
    stride_lb,
    stride_lh,
    stride_lm,
    q_heads,
    group,
    q_len,
    k_len,
    window,
    qk_scale,
    q_len_bucket,
    k_len_bucket,
    HEAD_DIM: tl.constexpr,
    WINDOWED: tl.constexpr,
    WITH_VALUES: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RAGGED: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    block = tl.program_id(0)
    batch = tl.program_id(1) // q_heads
    head = tl.program_id(1) % q_heads
    kv_head = head // group
    # This head's keys: k_len of them from entry ``first`` (its segment's own when RAGGED).
    first = 0
    if RAGGED:
        first, k_len = segment_span(offsets_ptr, lengths_ptr, batch * (q_heads // group) + kv_head)
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    offset = k_len - q_len
    rows_at = rows + offset

    q_base = q_ptr + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
    q_ptrs = q_base + rows.to(tl.int64)[:, None] * stride_qm + dims[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=rows[:, None] < q_len, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    b64, h64 = batch.to(tl.int64), kv_head.to(tl.int64)
    k_base = k_ptr + b64 * stride_kb + h64 * stride_kh + first * stride_kn
    v_base = v_ptr + b64 * stride_vb + h64 * stride_vh + first * stride_vn
    bias_base = bias_ptr + b64 * stride_bb + h64 * stride_bh + first * stride_bn

    # Key index bands of this block's real rows: [lo, hi) holds every key some row sees,
    # [full_lo, full_hi) the whole key blocks that every row sees.
    first_at = block * BLOCK_M + offset
    last_at = tl.minimum(block * BLOCK_M + BLOCK_M, q_len) - 1 + offset
    hi = last_at + 1
    if WINDOWED:
        lo = tl.maximum(first_at - window + 1, 0) // BLOCK_N * BLOCK_N
        full_lo = tl.cdiv(tl.maximum(last_at - window + 1, 0), BLOCK_N) * BLOCK_N
    else:
        lo = 0
        full_lo = 0
    full_hi = (first_at + 1) // BLOCK_N * BLOCK_N
    interior = full_lo < full_hi
    full_lo = tl.where(interior, full_lo, hi)
    full_hi = tl.where(interior, full_hi, hi)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    acc, l_i, m_i = _attend_blocks(
        acc, l_i, m_i, q, rows_at, k_base, v_base, bias_base, stride_kn, stride_kd, stride_vn, stride_vd,
        stride_bn, lo, full_lo, k_len, window, qk_scale,
        HEAD_DIM, BLOCK_N, True, WINDOWED, WITH_VALUES, HAS_BIAS, UPCAST, DOT_PRECISION,
    )  # fmt: skip
    acc, l_i, m_i = _attend_blocks(
        acc, l_i, m_i, q, rows_at, k_base, v_base, bias_base, stride_kn, stride_kd, stride_vn, stride_vd,
        stride_bn, full_lo, full_hi, k_len, window, qk_scale,
        HEAD_DIM, BLOCK_N, False, WINDOWED, WITH_VALUES, HAS_BIAS, UPCAST, DOT_PRECISION,
    )  # fmt: skip
    acc, l_i, m_i = _attend_blocks(
        acc, l_i, m_i, q, rows_at, k_base, v_base, bias_base, stride_kn, stride_kd, stride_vn, stride_vd,
        stride_bn, full_hi, hi, k_len, window, qk_scale,
        HEAD_DIM, BLOCK_N, True, WINDOWED, WITH_VALUES, HAS_BIAS, UPCAST, DOT_PRECISION,
    )  # fmt: skip

    # A row that sees no key (only possible with window < 1) gets output 0 and LSE -inf.
    seen_any = l_i > 0.0
    l_safe = tl.where(seen_any, l_i, 1.0)
    lse = tl.where(seen_any, (m_i + tl.math.log2(l_safe)) * LN2_IN_KERNEL, float("-inf"))
    lse_base = lse_ptr + batch.to(tl.int64) * stride_lb + head.to(tl.int64) * stride_lh
    tl.store(lse_base + rows.to(tl.int64) * stride_lm, lse, mask=rows < q_len)
    if WITH_VALUES:
        out_base = out_ptr + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh
        out_ptrs = out_base + rows.to(tl.int64)[:, None] * stride_om + dims[None, :] * stride_od
        result = acc / l_safe[:, None]
        tl.store(out_ptrs, rounded_to(result, out_ptr.dtype.element_ty, UPCAST), mask=rows[:, None] < q_len)


def attend(
    q: torch.Tensor,
    memory: Memory,
    scale: float,
    window: int | None,
    out: torch.Tensor | None,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Attention output (into ``out`` when given; none when ``memory`` has no values) and float32 LSE
    [B, Hq, Lq].

    Shapes and dtypes are the caller's to check (see ``backends.triton``).
    """
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads = memory.shape[1]
    with_values = memory.has_values
    if with_values and out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, q_heads, q_len, dtype=torch.float32, device=q.device)
    if q_len == 0 or batch * q_heads == 0:
        return out, lse
    # Without values the kernel never touches the output: it points at q.
    output = out if with_values else q

    def grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(q_len, meta["BLOCK_M"]), batch * q_heads

    _prefill_kernel[grid](
        *memory.pointers(), q, output, lse, *q.stride(), *output.stride(), *lse.stride(),
        q_heads, q_heads // kv_heads, q_len, memory.longest, window or 0, scale * LOG2E,
        length_bucket(q_len), length_bucket(memory.longest),
        HEAD_DIM=head_dim,
        WINDOWED=window is not None,
        WITH_VALUES=with_values,
        HAS_BIAS=memory.has_bias,
        RAGGED=memory.ragged,
        UPCAST=INTERPRETED,
        DOT_PRECISION=dot_precision(q.dtype),
    )  # fmt: skip
    return (out if with_values else None), lse
