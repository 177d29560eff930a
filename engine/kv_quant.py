"""Quantized KV entries: per-token asymmetric round-to-nearest, packed, with MiKV's key balancer.

Each vector (one token's key or value in one KV head) is stored as ``bits``-bit codes with its own
scale and zero (float16): ``x ≈ zero + code * scale``, ``scale = (max - min) / (2^bits - 1)``,
``zero = min`` (KIVI's and MiKV's per-token grouping, the group being the head dimension). Codes are
packed little-end first: two per byte at 4 bits, four at 2, eight codes in three bytes at 3.

Keys carry outlier channels that queries share. MiKV (Yang et al., "No Token Left Behind", arXiv
2402.18096) balances them before quantizing: ``b_c = sqrt(max|q_c| / max|k_c|)`` per channel, keys
stored as ``k * b`` and read back as ``deq / b``, so ``q . k`` is unchanged while the quantized range
no longer spans the outliers. Here ``b`` is tied across each rotary pair (channels c and c + D/2),
so balancing commutes with RoPE and one balancer serves the pre-RoPE and the rotated keys.
"""

from __future__ import annotations

import torch

BITS = (2, 3, 4, 8)
PARAMS_DTYPE = torch.float16  # scale and zero of each vector


def check_bits(bits: object, name: str = "kv_bits") -> int:
    if isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"{name} must be one of {', '.join(map(str, BITS))}, got {bits!r}")
    return int(bits)


class KVCodec:
    """Quantizes rows of ``head_dim`` values to ``bits`` bits each."""

    def __init__(self, bits: int, head_dim: int) -> None:
        self.bits = check_bits(bits)
        if (head_dim * self.bits) % 8 or (self.bits == 3 and head_dim % 8):
            raise ValueError(f"{bits}-bit codes of head_dim {head_dim} do not fill whole bytes")
        self.head_dim = head_dim
        self.levels = (1 << self.bits) - 1

    @property
    def packed_width(self) -> int:
        """Bytes of one vector's codes."""
        return self.head_dim * self.bits // 8

    @property
    def vector_bytes(self) -> int:
        """Bytes of one stored vector: its codes, scale and zero."""
        return self.packed_width + 2 * PARAMS_DTYPE.itemsize

    def empty_params(self, device: torch.device) -> torch.Tensor:
        return torch.empty(0, 2, dtype=PARAMS_DTYPE, device=device)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows [N, D] -> codes [N, packed_width] uint8 and (scale, zero) [N, 2] float16."""
        x = x.float()
        low, high = x.amin(dim=-1), x.amax(dim=-1)
        params = torch.stack((((high - low) / self.levels), low), dim=-1).to(PARAMS_DTYPE)
        scale, zero = params.float().unbind(-1)
        # Codes are rounded against the stored (float16) scale and zero, so a row on the grid
        # round-trips exactly; a constant row (scale 0) stores code 0.
        codes = ((x - zero[:, None]) / torch.where(scale > 0, scale, 1.0)[:, None]).round()
        return self._pack(codes.clamp(0, self.levels).to(torch.uint8)), params

    def decode(self, codes: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """Codes [N, packed_width] and params [N, 2] -> rows [N, D] float32."""
        params = params.float()
        # Multiply then add in place: on CPU about 3x faster than the broadcasting addcmul, and
        # decode runs it over the whole low tier every step.
        return self._unpack(codes).float().mul_(params[:, :1]).add_(params[:, 1:])

    def _pack(self, codes: torch.Tensor) -> torch.Tensor:
        if self.bits == 8:
            return codes
        if self.bits == 3:  # eight 3-bit codes -> 24 bits -> three bytes
            groups = codes.view(codes.shape[0], self.head_dim // 8, 8).int()
            word = (groups << (3 * torch.arange(8, device=codes.device, dtype=torch.int32))).sum(-1)
            shifts = 8 * torch.arange(3, device=codes.device, dtype=torch.int32)
            packed = ((word[..., None] >> shifts) & 0xFF).to(torch.uint8)
            return packed.view(codes.shape[0], self.packed_width)
        per_byte = 8 // self.bits
        groups = codes.view(codes.shape[0], self.head_dim // per_byte, per_byte).int()
        shifts = self.bits * torch.arange(per_byte, device=codes.device, dtype=torch.int32)
        return (groups << shifts).sum(-1).to(torch.uint8)

    def _unpack(self, packed: torch.Tensor) -> torch.Tensor:
        if self.bits == 8:
            return packed
        rows = packed.shape[0]
        if self.bits == 3:
            triples = packed.view(rows, self.head_dim // 8, 3).int()
            word = (triples << (8 * torch.arange(3, device=packed.device, dtype=torch.int32))).sum(-1)
            shifts = 3 * torch.arange(8, device=packed.device, dtype=torch.int32)
            return ((word[..., None] >> shifts) & 0x7).view(rows, self.head_dim)
        # One shift per code in a byte, stacked: about 2x faster on CPU than a broadcast shift. The
        # first code needs no shift and the last no mask.
        per_byte = 8 // self.bits
        codes = [packed & self.levels]
        codes += [(packed >> (self.bits * index)) & self.levels for index in range(1, per_byte - 1)]
        codes.append(packed >> (self.bits * (per_byte - 1)))
        return torch.stack(codes, dim=-1).view(rows, self.head_dim)


def assemble(
    codec: KVCodec,
    high: torch.Tensor,
    codes: torch.Tensor,
    params: torch.Tensor,
    order: torch.Tensor,
    balance: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rows [len(order), D] of a two-tier store: row i is row ``order[i]`` of [the low tier's ``codes``
    dequantized (then divided by ``balance``, keys' balancer per row); ``high``], in ``high``'s dtype."""
    low = codec.decode(codes, params)
    if balance is not None:
        low.div_(balance)
    return torch.cat((low.to(high.dtype), high)).index_select(0, order)


def key_balancer(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """MiKV's per-channel balancer [B, Hkv, D] from pre-RoPE q [B, Hq, n, D] and k [B, Hkv, n, D]:
    ``sqrt(max|q| / max|k|)`` over the tokens (and a KV head's group of query heads), tied across
    each rotary pair so that it commutes with RoPE. Channels either side never saw stay at 1."""
    batch, kv_heads, _, dim = k.shape
    q_max = q.float().abs().amax(dim=2).view(batch, kv_heads, -1, dim).amax(dim=2)
    k_max = k.float().abs().amax(dim=2)
    half = dim // 2
    q_max = torch.maximum(q_max[..., :half], q_max[..., half:]).repeat(1, 1, 2)
    k_max = torch.maximum(k_max[..., :half], k_max[..., half:]).repeat(1, 1, 2)
    seen = (q_max > 0) & (k_max > 0)
    return torch.where(seen, (q_max / torch.where(seen, k_max, 1.0)).sqrt(), 1.0)
