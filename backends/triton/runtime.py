"""How the kernels run: compiled for a GPU, or simulated on the CPU by Triton's interpreter.

The choice is fixed when the kernel modules are imported (``@triton.jit`` reads ``TRITON_INTERPRET``),
so everything here is decided once, at import. The interpreter differs from the GPU in ways the
kernels must respect: it computes bfloat16 arithmetic on raw bit patterns (every load is upcast to
float32 there, the kernels' ``UPCAST``), it truncates float32 to bfloat16 instead of rounding to
nearest, and it cannot benchmark, so autotuning gets a single config.

What the kernels share lives here too: ``Memory``, the keys, values and biases of either layout (a
rectangle, or KV heads of different lengths in flat buffers) as one set of kernel arguments, and the
kernel helpers that address them; ``PackedTiers`` and ``packed_tile`` for a memory whose low tier is
stored as packed codes (``backends.Packed``), dequantized in registers as it is read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from backends import Packed, Segments

INTERPRETED: bool = bool(triton.knobs.runtime.interpret)

LOG2E = 1.4426950408889634
# Constants for use inside kernels, which may only read globals that are constexpr.
LOG2E_IN_KERNEL = tl.constexpr(LOG2E)
LN2_IN_KERNEL = tl.constexpr(0.6931471805599453)

# Shared memory per block when the device does not say (the smallest opt-in limit of recent NVIDIA
# consumer GPUs); A100 and H100 report 163 and 227 KiB.
DEFAULT_SHARED_MEMORY = 99 * 1024


def shared_memory_limit(tensor: torch.Tensor) -> int:
    """Bytes of shared memory one program may use on ``tensor``'s GPU."""
    properties = torch.cuda.get_device_properties(tensor.device)
    return getattr(properties, "shared_memory_per_block_optin", DEFAULT_SHARED_MEMORY)


def launch_config(block_m: int, block_n: int, warps: int, stages: int) -> triton.Config:
    """A launch configuration of a kernel tiled ``BLOCK_M`` x ``BLOCK_N``."""
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


def autotune(
    gpu_configs: list[triton.Config],
    interpreter_config: triton.Config,
    key: list[str],
    shared_memory: Callable[[triton.Config, dict], int],
) -> Callable:
    """``triton.autotune`` over ``gpu_configs`` keyed on ``key`` (and the tensors' dtypes), pruned to
    the configs whose ``shared_memory(config, args)`` estimate fits the device (the smallest if none
    does); under the interpreter, which cannot benchmark, just ``interpreter_config``."""
    if INTERPRETED:
        return triton.autotune(configs=[interpreter_config], key=[])

    def prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        args = {**named_args, **kwargs}
        limit = shared_memory_limit(next(value for value in args.values() if isinstance(value, torch.Tensor)))
        fitting = [config for config in configs if shared_memory(config, args) <= limit]
        return fitting or [min(configs, key=lambda config: shared_memory(config, args))]

    return triton.autotune(configs=gpu_configs, key=key, prune_configs_by={"early_config_prune": prune})


@triton.jit
def rounded_to(x, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """Float32 ``x`` in ``dtype``, rounded to nearest even as on the GPU. The interpreter (``UPCAST``)
    truncates to bfloat16, so there the rounding is applied to the bits first."""
    if UPCAST and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


def dot_precision(dtype: torch.dtype) -> str | None:
    """``tl.dot``'s input precision: float32 inputs must not be rounded to TF32 (the GPU default), so
    that float32 results match the float32 reference; other dtypes keep the default."""
    return "ieee" if dtype == torch.float32 else None


def length_bucket(length: int) -> int:
    """An autotune key for a length: the next power of two, so that a chunked prefill whose key
    length grows every step retunes a handful of times, not once per step. (For the same reason the
    kernels do not specialise on lengths: each new divisibility by 16 would compile a new variant.)"""
    return triton.next_power_of_2(max(length, 1))


def tile_bytes(args: dict, tensor: str, rows: int, head_dim: int) -> int:
    """Bytes of a [rows, head_dim] tile of the tensor argument named ``tensor``."""
    return rows * head_dim * args[tensor].element_size()


@dataclass(frozen=True)
class Memory:
    """The keys, values and biases the kernels read, in one form for both layouts.

    Every kernel addresses segment (b, h)'s entry j at ``b * stride_b + h * stride_h + (first + j) *
    stride_n``. A rectangular [B, Hkv, Lk, D] memory is segments of ``Lk`` entries from ``first = 0``
    of their (b, h) base; flat ``Segments`` buffers have batch and head strides 0, and each segment's
    ``first`` and length come from ``spans`` (read in the kernel by ``segment_span``). Unused
    pointers (no values, no bias, no spans) point at the keys: the kernels never read them then.
    """

    keys: torch.Tensor
    values: torch.Tensor
    bias: torch.Tensor
    spans: torch.Tensor  # int32 [2, B * Hkv]: offsets, then lengths (RAGGED only)
    key_strides: tuple[int, int, int, int]  # batch, head, entry, dim
    value_strides: tuple[int, int, int, int]
    bias_strides: tuple[int, int, int]  # batch, head, entry
    shape: tuple[int, int]  # (B, Hkv)
    longest: int
    has_values: bool
    has_bias: bool
    ragged: bool

    @classmethod
    def of(cls, k: torch.Tensor | Segments, v: torch.Tensor | None, bias: torch.Tensor | None) -> Memory:
        """``k`` and ``v`` [B, Hkv, Lk, D] with ``bias`` [B, Hkv, Lk] or None, or ``k`` a ``Segments``
        (whose own bias counts; ``v`` is then ignored). Shapes are the caller's to check."""
        if isinstance(k, Segments):
            keys, values, bias = k.keys, k.values, k.bias
            spans = torch.tensor([k.offsets, k.lengths], dtype=torch.int32, device=keys.device)
            flat_bias = (0, 0, bias.stride(0)) if bias is not None else (0, 0, 0)
            return cls(
                keys, values, keys if bias is None else bias, spans,
                (0, 0, *keys.stride()), (0, 0, *values.stride()), flat_bias,
                k.shape, k.longest, True, bias is not None, True,
            )  # fmt: skip
        values = k if v is None else v
        return cls(
            k, values, k if bias is None else bias, k,
            tuple(k.stride()), tuple(values.stride()), (0, 0, 0) if bias is None else tuple(bias.stride()),
            (k.shape[0], k.shape[1]), k.shape[2], v is not None, bias is not None, False,
        )  # fmt: skip

    def keys_only(self) -> Memory:
        """This memory without its values (for the LSE alone)."""
        return replace(self, values=self.keys, value_strides=self.key_strides, has_values=False)

    def pointers(self) -> tuple[torch.Tensor, ...]:
        """The kernels' memory arguments: keys, values, bias, offsets, lengths, then their strides."""
        offsets, lengths = (self.spans[0], self.spans[1]) if self.ragged else (self.keys, self.keys)
        return (
            self.keys, self.values, self.bias, offsets, lengths,
            *self.key_strides, *self.value_strides, *self.bias_strides,
        )  # fmt: skip


@triton.jit
def segment_span(offsets_ptr, lengths_ptr, segment):
    """(first entry, entries) of ``segment`` (b * Hkv + h) of flat buffers. Kernels call it only
    when ``RAGGED``: the interpreter pays about a millisecond for every call of a ``@triton.jit``
    helper, and the rectangle (entry 0 of each head's base, k_len entries) needs none."""
    return tl.load(offsets_ptr + segment).to(tl.int64), tl.load(lengths_ptr + segment)


@dataclass(frozen=True)
class PackedTiers:
    """What a kernel reads of a ``Packed`` memory besides ``Memory`` (whose keys and values are then
    the full-precision tier): each entry's row, the low tier's codes, params and balancer."""

    order: torch.Tensor
    low_keys: torch.Tensor
    low_values: torch.Tensor
    low_key_params: torch.Tensor
    low_value_params: torch.Tensor
    low_balance: torch.Tensor
    low_rows: int
    bits: int

    @classmethod
    def of(cls, packed: Packed) -> tuple[Memory, PackedTiers]:
        """The ``Memory`` (flat segments over the full-precision tier) and tiers of ``packed``."""
        plain = Segments(packed.high_keys, packed.high_values, packed.offsets, packed.lengths, packed.shape,
                         packed.bias)  # fmt: skip
        tiers = cls(
            packed.order, packed.low_keys.contiguous(), packed.low_values.contiguous(),
            packed.low_key_params.contiguous(), packed.low_value_params.contiguous(),
            packed.low_balance.contiguous(), packed.low_keys.shape[0], packed.bits,
        )  # fmt: skip
        return Memory.of(plain, None, None), tiers

    @staticmethod
    def absent(memory: Memory) -> tuple:
        """Kernel arguments standing for no tiers (the pointers are never read)."""
        return (memory.keys,) * 6 + (0,)

    def pointers(self) -> tuple:
        return (
            self.order, self.low_keys, self.low_values, self.low_key_params, self.low_value_params,
            self.low_balance, self.low_rows,
        )  # fmt: skip


@triton.jit
def packed_tile(
    rows, inside, low_rows, plain_ptr, stride_plain, codes_ptr, params_ptr, balance_ptr,
    HEAD_DIM: tl.constexpr, BITS: tl.constexpr, BALANCED: tl.constexpr,
):  # fmt: skip
    """Float32 [BLOCK_N, HEAD_DIM] tile of the entries whose rows in [low; full precision] are ``rows``:
    full-precision rows loaded as they are, low rows' codes unpacked and dequantized here (``code *
    scale + zero``, divided by the balancer when ``BALANCED``). A code starts at bit ``d * BITS`` of
    its row and may straddle two bytes (3 bits), so two bytes are read for each."""
    dims = tl.arange(0, HEAD_DIM)
    low = rows < low_rows
    high = tl.load(
        plain_ptr + (rows - low_rows)[:, None] * stride_plain + dims[None, :],
        mask=(inside & ~low)[:, None],
        other=0.0,
    ).to(tl.float32)
    width: tl.constexpr = HEAD_DIM * BITS // 8
    bit = dims * BITS
    byte = bit // 8
    reading = (inside & low)[:, None]
    row_codes = codes_ptr + rows[:, None] * width
    first = tl.load(row_codes + byte[None, :], mask=reading, other=0).to(tl.int32)
    second = tl.load(row_codes + byte[None, :] + 1, mask=reading & (byte[None, :] + 1 < width), other=0)
    codes = ((first | (second.to(tl.int32) << 8)) >> (bit % 8)[None, :]) & ((1 << BITS) - 1)
    scale = tl.load(params_ptr + rows * 2, mask=inside & low, other=0.0).to(tl.float32)
    zero = tl.load(params_ptr + rows * 2 + 1, mask=inside & low, other=0.0).to(tl.float32)
    dequantized = codes.to(tl.float32) * scale[:, None] + zero[:, None]
    if BALANCED:
        dequantized /= tl.load(
            balance_ptr + rows[:, None] * HEAD_DIM + dims[None, :], mask=reading, other=1.0
        )
    return tl.where(low[:, None], dequantized, high)
