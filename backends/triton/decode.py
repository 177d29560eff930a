"""Split-K "flash decoding": one query row per sequence against the whole cache.

A single query row gives a prefill-style grid one program per head, far too few to keep a GPU busy
on a long cache. Here the visible keys are cut into splits; one program handles one split for all
query heads of a KV group at once (the group's rows share each K/V tile it loads) and writes a
partial (max, sum, weighted values). A second, small kernel merges the splits of each head into the
output and the LSE.

KV heads of different lengths (``RAGGED``) are read in place from their flat buffers: the splits are
cut for the longest, and a shorter segment's splits past its end are empty partials (max -inf, sum
0), which the merge weighs 0. Entries may carry a logit bias (``HAS_BIAS``), added to the scaled
score of its key. A two-tier memory (``PACKED``, always flat) is read through each entry's row: the
full-precision tier as it is, the low tier's packed codes dequantized in registers (``packed_tile``),
so no full-precision copy of it is ever made.
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
    PackedTiers,
    autotune,
    dot_precision,
    length_bucket,
    packed_tile,
    rounded_to,
    segment_span,
    tile_bytes,
)

# tl.dot needs at least 16 rows on a GPU: a group of fewer query heads is padded up to this.
MIN_GROUP_ROWS = 16
MAX_SPLITS = 64
# Programs to aim for when no GPU says how many it runs at once (the interpreter): enough that
# several splits get merged, few enough to stay quick.
INTERPRETER_PROGRAMS = 8


def _block_n(head_dim: int) -> int:
    if INTERPRETED:
        return 32
    return 32 if head_dim > 128 else 64


def _shared_memory(config: triton.Config, args: dict) -> int:
    head_dim, stages = args["HEAD_DIM"], max(config.num_stages, 1)
    return 2 * stages * tile_bytes(args, "k_ptr", args["BLOCK_N"], head_dim)


_GPU_CONFIGS = [
    triton.Config({}, num_warps=4, num_stages=2),
    triton.Config({}, num_warps=4, num_stages=3),
    triton.Config({}, num_warps=8, num_stages=3),
]


@autotune(
    _GPU_CONFIGS,
    triton.Config({}, num_warps=1, num_stages=1),
    key=["HEAD_DIM", "GROUP_ROWS", "split_bucket", "HAS_BIAS", "RAGGED", "PACKED", "BITS"],
    shared_memory=_shared_memory,
)
@triton.jit(do_not_specialize=["splits", "window", "k_len", "split_len", "split_bucket", "low_rows"])
def _split_kernel(
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
    part_m_ptr,
    part_l_ptr,
    part_acc_ptr,
    stride_qb,
    stride_qh,
    stride_qd,
    kv_heads,
    group,
    splits,
    window,
    k_len,
    split_len,
    qk_scale,
    split_bucket,
    order_ptr,
    low_k_ptr,
    low_v_ptr,
    low_k_params_ptr,
    low_v_params_ptr,
    balance_ptr,
    low_rows,
    HEAD_DIM: tl.constexpr,
    GROUP_ROWS: tl.constexpr,
    WINDOWED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RAGGED: tl.constexpr,
    PACKED: tl.constexpr,
    BITS: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    split = tl.program_id(0)
    batch = tl.program_id(1) // kv_heads
    kv_head = tl.program_id(1) % kv_heads
    members = tl.arange(0, GROUP_ROWS)
    real = members < group
    heads = (kv_head * group + members).to(tl.int64)
    dims = tl.arange(0, HEAD_DIM)

    q_ptrs = q_ptr + batch.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + dims[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=real[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    # This KV head's keys: k_len of them from entry ``first`` (its segment's own when RAGGED), of
    # which the query (the last) sees those from first_key on.
    first = 0
    if RAGGED:
        first, k_len = segment_span(offsets_ptr, lengths_ptr, tl.program_id(1))
    first_key = tl.maximum(k_len - window, 0) if WINDOWED else 0
    b64, h64 = batch.to(tl.int64), kv_head.to(tl.int64)
    k_base = k_ptr + b64 * stride_kb + h64 * stride_kh + first * stride_kn
    v_base = v_ptr + b64 * stride_vb + h64 * stride_vh + first * stride_vn
    bias_base = bias_ptr + b64 * stride_bb + h64 * stride_bh + first * stride_bn

    # A split past the end of a shorter segment is empty: its partial stays (-inf, 0, 0).
    start = first_key + split * split_len
    end = tl.minimum(start + split_len, k_len)
    m_i = tl.full([GROUP_ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_ROWS], tl.float32)
    acc = tl.zeros([GROUP_ROWS, HEAD_DIM], tl.float32)
    # Every block holds at least one key of the split, so each row's running max is finite after it.
    for start_n in range(start, end, BLOCK_N):
        keys = start_n + tl.arange(0, BLOCK_N)
        inside = keys < end
        key_offsets = keys.to(tl.int64)
        if PACKED:  # k_ptr and v_ptr are the full-precision tier's stores
            rows = tl.load(order_ptr + first + key_offsets, mask=inside, other=0)
            k = packed_tile(
                rows, inside, low_rows, k_ptr, stride_kn, low_k_ptr, low_k_params_ptr, balance_ptr,
                HEAD_DIM, BITS, True,
            )  # fmt: skip
            v = packed_tile(
                rows, inside, low_rows, v_ptr, stride_vn, low_v_ptr, low_v_params_ptr, balance_ptr,
                HEAD_DIM, BITS, False,
            )  # fmt: skip
            # Rounded to the memory's dtype first, as the engine's dequantized reads are.
            k = rounded_to(tl.trans(k), k_ptr.dtype.element_ty, UPCAST).to(q.dtype)
            v = rounded_to(v, v_ptr.dtype.element_ty, UPCAST).to(q.dtype)
        else:
            k = tl.load(
                k_base + key_offsets[None, :] * stride_kn + dims[:, None] * stride_kd,
                mask=inside[None, :],
                other=0.0,
            )
            v = tl.load(
                v_base + key_offsets[:, None] * stride_vn + dims[None, :] * stride_vd,
                mask=inside[:, None],
                other=0.0,
            )
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
        scores = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
        if HAS_BIAS:
            bias = tl.load(bias_base + key_offsets * stride_bn, mask=inside, other=0.0)
            scores += bias.to(tl.float32)[None, :] * LOG2E_IN_KERNEL
        scores = tl.where(inside[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        p = tl.math.exp2(scores - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    # Partials are contiguous [B, Hq, splits] and [B, Hq, splits, D].
    part = (batch.to(tl.int64) * kv_heads * group + heads) * splits + split
    tl.store(part_m_ptr + part, m_i, mask=real)
    tl.store(part_l_ptr + part, l_i, mask=real)
    tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + dims[None, :], acc, mask=real[:, None])


@triton.jit(do_not_specialize=["splits"])
def _merge_kernel(
    part_m_ptr,
    part_l_ptr,
    part_acc_ptr,
    out_ptr,
    lse_ptr,
    stride_ob,
    stride_oh,
    stride_od,
    stride_lb,
    stride_lh,
    q_heads,
    splits,
    HEAD_DIM: tl.constexpr,
    SPLITS: tl.constexpr,
    UPCAST: tl.constexpr,
):
    row = tl.program_id(0)
    batch = row // q_heads
    head = row % q_heads
    parts = tl.arange(0, SPLITS)
    real = parts < splits
    dims = tl.arange(0, HEAD_DIM)
    part = row.to(tl.int64) * splits + parts
    m = tl.load(part_m_ptr + part, mask=real, other=float("-inf"))
    sums = tl.load(part_l_ptr + part, mask=real, other=0.0)
    acc = tl.load(part_acc_ptr + part[:, None] * HEAD_DIM + dims[None, :], mask=real[:, None], other=0.0)
    # Padding and empty splits have max -inf and sum 0: weight 0 (every row sees its own key, so
    # some split is not empty and m_all is finite).
    m_all = tl.max(m, 0)
    weight = tl.math.exp2(m - m_all)
    l_all = tl.sum(sums * weight, 0)
    result = tl.sum(acc * weight[:, None], 0) / l_all
    out_base = out_ptr + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh
    tl.store(out_base + dims * stride_od, rounded_to(result, out_ptr.dtype.element_ty, UPCAST))
    tl.store(
        lse_ptr + batch.to(tl.int64) * stride_lb + head.to(tl.int64) * stride_lh,
        (m_all + tl.math.log2(l_all)) * LN2_IN_KERNEL,
    )


def _split_count(visible: int, block_n: int, kv_programs: int, device: torch.device) -> int:
    """Splits per KV head: enough programs to fill the GPU about four times over, at least a block each."""
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = INTERPRETER_PROGRAMS
    return max(1, min(triton.cdiv(visible, block_n), triton.cdiv(target, kv_programs), MAX_SPLITS))


def decode(
    q: torch.Tensor,
    memory: Memory,
    scale: float,
    window: int | None,
    out: torch.Tensor | None,
    tiers: PackedTiers | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output [B, Hq, 1, D] (into ``out`` when given) and float32 LSE [B, Hq, 1] of the single query
    row at the end of each KV head's keys. The window is assumed positive and every head non-empty.
    With ``tiers``, ``memory`` is a ``Packed`` memory's (``PackedTiers.of``)."""
    batch, q_heads, _, head_dim = q.shape
    kv_heads, longest = memory.shape[1], memory.longest
    group = q_heads // kv_heads
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, q_heads, 1, dtype=torch.float32, device=q.device)
    if batch * q_heads == 0:
        return out, lse

    # Cut for the longest head's visible keys; a shorter head's splits past its end are empty.
    visible = longest if window is None else min(longest, window)
    block_n = _block_n(head_dim)
    splits = _split_count(visible, block_n, batch * kv_heads, q.device)
    split_len = triton.cdiv(triton.cdiv(visible, splits), block_n) * block_n
    splits = triton.cdiv(visible, split_len)

    part_m = torch.empty(batch, q_heads, splits, dtype=torch.float32, device=q.device)
    part_l = torch.empty_like(part_m)
    part_acc = torch.empty(batch, q_heads, splits, head_dim, dtype=torch.float32, device=q.device)
    _split_kernel[(splits, batch * kv_heads)](
        *memory.pointers(), q, part_m, part_l, part_acc, q.stride(0), q.stride(1), q.stride(3),
        kv_heads, group, splits, window or 0, longest, split_len, scale * LOG2E,
        length_bucket(split_len),
        *(PackedTiers.absent(memory) if tiers is None else tiers.pointers()),
        HEAD_DIM=head_dim,
        GROUP_ROWS=max(MIN_GROUP_ROWS, triton.next_power_of_2(group)),
        WINDOWED=window is not None,
        HAS_BIAS=memory.has_bias,
        RAGGED=memory.ragged,
        PACKED=tiers is not None,
        BITS=8 if tiers is None else tiers.bits,
        UPCAST=INTERPRETED,
        DOT_PRECISION=dot_precision(q.dtype),
        BLOCK_N=block_n,
    )  # fmt: skip
    _merge_kernel[(batch * q_heads,)](
        part_m, part_l, part_acc, out, lse,
        out.stride(0), out.stride(1), out.stride(3), lse.stride(0), lse.stride(1),
        q_heads, splits,
        HEAD_DIM=head_dim,
        SPLITS=triton.next_power_of_2(splits),
        UPCAST=INTERPRETED,
    )  # fmt: skip
    return out, lse
