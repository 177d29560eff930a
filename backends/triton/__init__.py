"""The Triton backend: fused prefill (with LSE), per-key score and split-K decode kernels.

On a machine without a GPU the kernels run under Triton's interpreter, which
``backends.prepare_triton`` switches on (``TRITON_INTERPRET=1``) before triton is imported. Doing
this for the whole process is safe: without a GPU no compiled Triton kernel can launch at all, so
the only effect on other Triton code is to make it run, slowly, instead of failing. An explicit
``TRITON_INTERPRET=0`` is respected; the backend then reports CPU work as unsupported. Kernels
only run on CUDA (or ROCm, which PyTorch also calls "cuda") devices, or interpreted on CPU tensors.
"""

from __future__ import annotations

import importlib.util

import torch

from backends import AttentionOutput, AttentionSpec, Backend, KeyStats, Segments, prepare_triton

prepare_triton()
if importlib.util.find_spec("triton") is None:
    raise ImportError(
        "the triton backend needs Triton: pip install triton (or pip install 'imdc-engine[triton]')"
    )

from backends.triton import decode, prefill, scores  # noqa: E402  (after choosing the mode)
from backends.triton.runtime import INTERPRETED  # noqa: E402

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HEAD_DIMS = (16, 32, 64, 128, 256)


class TritonBackend(Backend):
    name = "triton"
    interpreted = INTERPRETED  # kernels simulated on the CPU: right, but far too slow to time

    def lacks(self, spec: AttentionSpec) -> str | None:
        if spec.dtype not in DTYPES:
            return f"its kernels take {', '.join(str(d).removeprefix('torch.') for d in DTYPES)}"
        if spec.head_dim not in HEAD_DIMS:
            return f"its kernels take head dims {', '.join(map(str, HEAD_DIMS))}"
        if spec.group < 1 or (spec.window is not None and spec.window < 1):
            return "the GQA group and window must be positive"
        if spec.segments or spec.bias:
            return "its kernels do not read heads of different lengths or biased entries yet"
        if spec.query_head_stats:
            return "its statistics kernel sums each KV head's group"
        if not _runs_on(torch.device(spec.device)):
            return "its kernels run on CUDA devices, or interpreted on the CPU (TRITON_INTERPRET=1)"
        return None

    def prefill(self, q, k, v, *, scale=None, window=None, out=None, bias=None) -> AttentionOutput:
        _check_plain(k, bias)
        _check_inputs(q, k, v, window)
        _check_out(out, q.shape, q.dtype, q.device)
        result, lse = prefill.attend(q, k, v, _scale(q, scale), window, out)
        return AttentionOutput(result, lse)

    def scores(
        self, q, k, *, lse=None, last=None, scale=None, window=None, out=None, bias=None, by_query_head=False
    ) -> KeyStats:
        _check_plain(k, bias)
        if by_query_head:
            raise ValueError("the triton backend's statistics are per KV head, not per query head")
        _check_inputs(q, k, None, window)
        batch, q_heads, q_len, _ = q.shape
        kv_heads, k_len = k.shape[1], k.shape[2]
        _check_out(out, (batch, kv_heads, k_len), torch.float32, q.device)
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
            _, row_lse = prefill.attend(scored, k, None, scale, window, None)
        else:
            row_lse = lse[:, :, first:].to(device=q.device, dtype=torch.float32)
        mass = scores.key_mass(scored, k, row_lse, scale, window, out)
        return KeyStats(mass, _visible_counts(q_len - first, k_len, window, q.device))

    def decode(self, q, k, v, *, scale=None, window=None, out=None, bias=None) -> AttentionOutput:
        _check_plain(k, bias)
        if q.dim() != 4 or q.shape[2] != 1:
            return self.prefill(q, k, v, scale=scale, window=window, out=out)
        _check_inputs(q, k, v, window)
        _check_out(out, q.shape, q.dtype, q.device)
        if k.shape[2] == 0:
            raise ValueError("triton backend: decode needs at least one cached key (the query's own)")
        result, lse = decode.decode(q, k, v, _scale(q, scale), window, out)
        return AttentionOutput(result, lse)


def _check_plain(k, bias) -> None:
    if isinstance(k, Segments) or bias is not None:
        raise ValueError("the triton backend does not read heads of different lengths or biased entries yet")


def _runs_on(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and INTERPRETED


def _scale(q: torch.Tensor, scale: float | None) -> float:
    return q.shape[-1] ** -0.5 if scale is None else float(scale)


def _visible_counts(rows: int, k_len: int, window: int | None, device: torch.device) -> torch.Tensor:
    """[k_len] int64: how many of the last ``rows`` queries see each key (``reference.visible``'s rule,
    in closed form so that no [rows, k_len] mask is built). Those rows sit at key indices
    k_len - rows .. k_len - 1 and see key j from index j to j + window - 1."""
    keys = torch.arange(k_len, device=device)
    last_seen = keys + (window - 1) if window is not None else torch.full_like(keys, k_len - 1)
    first_seen = keys.clamp(min=k_len - rows)
    return (last_seen.clamp(max=k_len - 1) - first_seen + 1).clamp(min=0)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, window: int | None) -> None:
    if q.dim() != 4 or k.dim() != 4:
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
    if kv_heads == 0 or q_heads % kv_heads:
        raise ValueError(f"triton backend: {q_heads} query heads are not a multiple of {kv_heads} KV heads")
    if k_len < q_len:
        raise ValueError(f"triton backend: {k_len} keys cannot serve {q_len} queries (keys = memory + chunk)")
    if window is not None and window < 1:
        raise ValueError(f"triton backend: window must be a positive number of keys or None, got {window}")
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"triton backend: head dim {head_dim} unsupported; use one of {HEAD_DIMS}")
    tensors = [q, k] if v is None else [q, k, v]
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
