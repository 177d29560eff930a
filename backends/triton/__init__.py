"""The Triton backend: fused prefill (with LSE), per-key score and split-K decode kernels.

On a machine without a GPU the kernels run under Triton's interpreter, which
``backends.prepare_triton`` switches on (``TRITON_INTERPRET=1``) before triton is imported. Doing
this for the whole process is safe: without a GPU no compiled Triton kernel can launch at all, so
the only effect on other Triton code is to make it run, slowly, instead of failing. An explicit
``TRITON_INTERPRET=0`` is respected; the backend then reports CPU work as unsupported. Kernels
only run on CUDA (or ROCm, which PyTorch also calls "cuda") devices, or interpreted on CPU tensors.

KV heads of different lengths (``Segments``) are read in place from their flat buffers, and biased
entries add their bias to their scores, by the same kernels as the rectangular memory (see
``runtime.Memory``). Decode reads a two-tier memory (``Packed``) as stored, dequantizing its packed
low tier in registers; prefill and scores read it dequantized (``Packed.segments``).
"""

from __future__ import annotations

import importlib.util

import torch

from backends import AttentionOutput, AttentionSpec, Backend, KeyStats, Packed, Segments, prepare_triton

prepare_triton()
if importlib.util.find_spec("triton") is None:
    raise ImportError(
        "the triton backend needs Triton: pip install triton (or pip install 'imdc-engine[triton]')"
    )

from backends.triton import decode, prefill, scores  # noqa: E402  (after choosing the mode)
from backends.triton.runtime import INTERPRETED, Memory, PackedTiers  # noqa: E402

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HEAD_DIMS = (16, 32, 64, 128, 256)


class TritonBackend(Backend):
    name = "triton"
    reads_packed = True
    interpreted = INTERPRETED  # kernels simulated on the CPU: right, but far too slow to time

    def lacks(self, spec: AttentionSpec) -> str | None:
        if spec.dtype not in DTYPES:
            return f"its kernels take {', '.join(str(d).removeprefix('torch.') for d in DTYPES)}"
        if spec.head_dim not in HEAD_DIMS:
            return f"its kernels take head dims {', '.join(map(str, HEAD_DIMS))}"
        if spec.group < 1 or (spec.window is not None and spec.window < 1):
            return "the GQA group and window must be positive"
        if not _runs_on(torch.device(spec.device)):
            return "its kernels run on CUDA devices, or interpreted on the CPU (TRITON_INTERPRET=1)"
        if spec.distant:
            return "its kernels read one key source (the reference and sdpa backends read POD's two)"
        return None

    def prefill(self, q, k, v, *, scale=None, window=None, out=None, bias=None) -> AttentionOutput:
        k = k.segments() if isinstance(k, Packed) else k
        memory = _memory(q, k, v, bias, window)
        _check_out(out, q.shape, q.dtype, q.device)
        result, lse = prefill.attend(q, memory, _scale(q, scale), window, out)
        return AttentionOutput(result, lse)

    def scores(
        self, q, k, *, lse=None, last=None, scale=None, window=None, out=None, bias=None, by_query_head=False
    ) -> KeyStats:
        k = k.segments() if isinstance(k, Packed) else k
        memory = _memory(q, k, None, bias, window)
        batch, q_heads, q_len, _ = q.shape
        kv_heads, k_len = memory.shape[1], memory.longest
        _check_out(out, (batch, q_heads if by_query_head else kv_heads, k_len), torch.float32, q.device)
        if lse is not None and tuple(lse.shape) != (batch, q_heads, q_len):
            raise ValueError(
                f"triton backend: lse must have shape {[batch, q_heads, q_len]}, got {list(lse.shape)}"
            )
        if last is not None and last < 0:
            raise ValueError(f"triton backend: last must be a non-negative number of queries, got {last}")
        first = 0 if last is None else max(0, q_len - last)
        scored = q[:, :, first:]
        scale = _scale(q, scale)
        if lse is None:
            _, row_lse = prefill.attend(scored, memory.keys_only(), scale, window, None)
        else:
            row_lse = lse[:, :, first:].to(device=q.device, dtype=torch.float32)
        mass = scores.key_mass(scored, memory, row_lse, scale, window, out, by_query_head)
        lengths = memory.spans[1].long().view(batch, kv_heads, 1) if memory.ragged else k_len
        return KeyStats(mass, _visible_counts(q_len - first, lengths, k_len, window, q.device))

    def decode(self, q, k, v, *, scale=None, window=None, out=None, bias=None) -> AttentionOutput:
        if q.dim() != 4 or q.shape[2] != 1:
            return self.prefill(q, k, v, scale=scale, window=window, out=out, bias=bias)
        tiers = None
        if isinstance(k, Packed):
            _check_packed(q, k, bias)
            memory, tiers = PackedTiers.of(k)
        else:
            memory = _memory(q, k, v, bias, window)
        _check_out(out, q.shape, q.dtype, q.device)
        result, lse = decode.decode(q, memory, _scale(q, scale), window, out, tiers)
        return AttentionOutput(result, lse)


def _runs_on(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and INTERPRETED


def _scale(q: torch.Tensor, scale: float | None) -> float:
    return q.shape[-1] ** -0.5 if scale is None else float(scale)


def _visible_counts(
    rows: int, lengths: int | torch.Tensor, longest: int, window: int | None, device: torch.device
) -> torch.Tensor:
    """Int64: how many of the last ``rows`` queries see each key (``reference.visible``'s rule, in
    closed form so that no [rows, n] mask is built): [n] for keys all ``lengths = n`` long, or
    [B, Hkv, longest] for segments of ``lengths`` [B, Hkv, 1] right-aligned, 0 on their left
    padding. A segment's rows sit at key indices n - rows .. n - 1 and see key j from index j to
    j + window - 1."""
    keys = torch.arange(longest, device=device) - (longest - lengths)
    last_seen = keys + (window - 1) if window is not None else torch.zeros_like(keys) + (lengths - 1)
    counts = (last_seen.clamp(max=lengths - 1) - keys.clamp(min=lengths - rows) + 1).clamp(min=0)
    return counts if isinstance(lengths, int) else counts.masked_fill(keys < 0, 0)


def _memory(
    q: torch.Tensor,
    k: torch.Tensor | Segments,
    v: torch.Tensor | None,
    bias: torch.Tensor | None,
    window: int | None,
) -> Memory:
    """The memory the kernels read (``runtime.Memory``), once the inputs are checked."""
    if q.dim() != 4:
        raise ValueError(f"triton backend: q must be 4-D [B, Hq, Lq, D], got shape {list(q.shape)}")
    if isinstance(k, Segments):
        _check_segments(q, k, bias)
        tensors = [q, k.keys, k.values]
    else:
        _check_rectangle(q, k, v, bias)
        tensors = [q, k] if v is None else [q, k, v]
    _check_common(q, tensors, window)
    return Memory.of(k, v, bias)


def _check_rectangle(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, bias: torch.Tensor | None
) -> None:
    if k.dim() != 4:
        shapes = f"{list(q.shape)} and {list(k.shape)}"
        raise ValueError(f"triton backend: q and k must be 4-D [B, H, L, D], got shapes {shapes}")
    batch, q_heads, q_len, head_dim = q.shape
    kv_batch, kv_heads, k_len, kv_dim = k.shape
    if v is not None and v.shape != k.shape:
        raise ValueError(f"triton backend: v must have k's shape {list(k.shape)}, got {list(v.shape)}")
    if kv_batch != batch or kv_dim != head_dim:
        raise ValueError(
            f"triton backend: q {list(q.shape)} and k {list(k.shape)} differ in batch or head dim"
        )
    _check_heads(q_heads, kv_heads)
    if k_len < q_len:
        raise ValueError(f"triton backend: {k_len} keys cannot serve {q_len} queries (keys = memory + chunk)")
    _check_bias(bias, (batch, kv_heads, k_len), q.device)


def _check_segments(q: torch.Tensor, segments: Segments, bias: torch.Tensor | None) -> None:
    batch, q_heads, q_len, head_dim = q.shape
    keys, values = segments.keys, segments.values
    if bias is not None:
        raise ValueError("triton backend: the biases of Segments come in Segments.bias, not as bias")
    if keys.dim() != 2 or keys.shape[1] != head_dim or values is None or values.shape != keys.shape:
        shapes = f"{list(keys.shape)} and {None if values is None else list(values.shape)}"
        raise ValueError(f"triton backend: Segments keys and values must be [C, {head_dim}], got {shapes}")
    kv_batch, kv_heads = segments.shape
    if kv_batch != batch:
        raise ValueError(f"triton backend: Segments of batch {kv_batch} cannot serve q of batch {batch}")
    _check_heads(q_heads, kv_heads)
    count = batch * kv_heads
    if len(segments.offsets) != count or len(segments.lengths) != count:
        raise ValueError(
            f"triton backend: Segments of shape {segments.shape} need {count} offsets and lengths, got "
            f"{len(segments.offsets)} and {len(segments.lengths)}"
        )
    rows = keys.shape[0]
    outside = [
        s for s, (offset, length) in enumerate(zip(segments.offsets, segments.lengths, strict=True))
        if offset < 0 or length < 0 or offset + length > rows
    ]  # fmt: skip
    if outside:
        raise ValueError(f"triton backend: segment {outside[0]} lies outside the {rows} rows of its buffers")
    shortest = min(segments.lengths, default=q_len)
    if shortest < q_len:
        raise ValueError(
            f"triton backend: a segment of {shortest} keys cannot serve {q_len} queries "
            "(keys = memory + chunk)"
        )
    _check_bias(segments.bias, (rows,), q.device)


def _check_packed(q: torch.Tensor, packed: Packed, bias: torch.Tensor | None) -> None:
    """A ``Packed`` memory's tiers and segments, checked as ``Segments`` are."""
    batch, q_heads, _, head_dim = q.shape
    rows, width = packed.low_keys.shape[0], head_dim * packed.bits // 8
    high = packed.high_keys.shape[0]
    shapes = {
        "high_keys": (packed.high_keys, (high, head_dim)),
        "high_values": (packed.high_values, (high, head_dim)),
        "low_keys": (packed.low_keys, (rows, width)),
        "low_values": (packed.low_values, (rows, width)),
        "low_key_params": (packed.low_key_params, (rows, 2)),
        "low_value_params": (packed.low_value_params, (rows, 2)),
        "low_balance": (packed.low_balance, (rows, head_dim)),
    }
    for name, (tensor, shape) in shapes.items():
        if tuple(tensor.shape) != tuple(shape) or tensor.device != q.device:
            raise ValueError(f"triton backend: Packed {name} must be {list(shape)} on {q.device}, got "
                             f"{list(tensor.shape)} on {tensor.device}")  # fmt: skip
    if bias is not None:
        raise ValueError("triton backend: the biases of Packed come in Packed.bias, not as bias")
    if packed.shape[0] != batch or len(packed.offsets) != len(packed.lengths) != batch * packed.shape[1]:
        raise ValueError(f"triton backend: Packed of shape {packed.shape} does not serve q of batch {batch}")
    _check_heads(q_heads, packed.shape[1])
    ends = [offset + length for offset, length in zip(packed.offsets, packed.lengths, strict=True)]
    if packed.order.dtype != torch.int64 or max(ends, default=0) > packed.order.shape[0]:
        raise ValueError("triton backend: Packed order must be int64 with a row for every entry")
    _check_bias(packed.bias, tuple(packed.order.shape), q.device)
    _check_common(q, [q, packed.high_keys, packed.high_values], None)


def _check_heads(q_heads: int, kv_heads: int) -> None:
    if kv_heads == 0 or q_heads % kv_heads:
        raise ValueError(f"triton backend: {q_heads} query heads are not a multiple of {kv_heads} KV heads")


def _check_bias(bias: torch.Tensor | None, shape: tuple, device: torch.device) -> None:
    if bias is None:
        return
    if tuple(bias.shape) != shape or not bias.is_floating_point() or bias.device != device:
        raise ValueError(
            f"triton backend: bias must be a float tensor of shape {list(shape)} on {device}, "
            f"got {bias.dtype} {list(bias.shape)} on {bias.device}"
        )


def _check_common(q: torch.Tensor, tensors: list[torch.Tensor], window: int | None) -> None:
    head_dim = q.shape[-1]
    if window is not None and window < 1:
        raise ValueError(f"triton backend: window must be a positive number of keys or None, got {window}")
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"triton backend: head dim {head_dim} unsupported; use one of {HEAD_DIMS}")
    if any(tensor.dtype != q.dtype for tensor in tensors) or q.dtype not in DTYPES:
        dtypes = ", ".join(str(tensor.dtype) for tensor in tensors)
        raise ValueError(f"triton backend: q, k, v must share one of float32/float16/bfloat16, got {dtypes}")
    if any(tensor.device != q.device for tensor in tensors):
        raise ValueError("triton backend: q, k and v must be on the same device")
    if not _runs_on(q.device):
        raise ValueError(
            f"triton backend cannot run on {q.device}: use a CUDA device, or set TRITON_INTERPRET=1 "
            "before importing backends.triton to simulate the kernels on the CPU"
        )


def _check_out(out: torch.Tensor | None, shape: tuple, dtype: torch.dtype, device: torch.device) -> None:
    if out is None:
        return
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != device:
        raise ValueError(
            f"triton backend: out must be a {dtype} tensor of shape {list(shape)} on {device}, "
            f"got {out.dtype} {list(out.shape)} on {out.device}"
        )
