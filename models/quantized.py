"""Weight-only quantized layers: the weights stored in 8 or 4 bits, the activations in their own dtype.

Decode on a CPU is bound by reading the weights, so fewer bytes per weight is faster decode. The
matrix products run in PyTorch's packed CPU kernels (``_weight_int8pack_mm``,
``_weight_int4pack_mm_for_cpu``), which widen the weights in registers.

- ``int8``: one symmetric scale per output row: w = q * scale, q in -127..127.
- ``int4``: groups of ``GROUP`` inputs per output row, each with a scale and a zero point:
  w = q * scale + low, q in 0..15 (GGUF's Q4_1 exactly; Q4_0 is low = -8 * scale).
- the embedding table in ``int8`` rows, widened on lookup; a tied output head reads the same bytes.
"""

from __future__ import annotations

import torch
from torch import nn

GROUP = 32
INT4_ROWS = 16  # the packed int4 kernel takes output rows in multiples of this
FORMATS = ("int8", "int4")


class Int8Linear(nn.Module):
    """A bias-free linear layer with int8 weights [N, K] and one scale per output row."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, parts: tuple[int, ...]) -> None:
        super().__init__()
        self.parts = parts
        self.register_buffer("weight", weight)  # int8 [N, K]
        self.register_buffer("scales", scales)  # [N], in the activations' dtype

    @classmethod
    def quantize(cls, weight: torch.Tensor, parts: tuple[int, ...], dtype: torch.dtype) -> Int8Linear:
        codes, scales = quantize_int8(weight)
        return cls(codes, scales.to(dtype), parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        out = torch.ops.aten._weight_int8pack_mm(rows, self.weight, self.scales.to(x.dtype))
        return out.reshape(*x.shape[:-1], -1)


class Int4Linear(nn.Module):
    """A bias-free linear layer with 4-bit weights in groups of ``GROUP`` inputs, packed for the CPU."""

    def __init__(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor, parts: tuple[int, ...]) -> None:
        super().__init__()
        self.parts = parts
        self.register_buffer("packed", packed)  # uint8 [N, K / 2]
        self.register_buffer("scales_and_zeros", scales_and_zeros)  # [K / GROUP, N, 2]

    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        scales: torch.Tensor,
        lows: torch.Tensor,
        parts: tuple[int, ...],
        dtype: torch.dtype,
    ) -> Int4Linear:
        """From codes [N, K] in 0..15 and per-group ``scales``, ``lows`` [N, K/GROUP]: w = q scale + low."""
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
        # The kernel computes (q - 8) * scale + zero.
        scales_and_zeros = torch.stack((scales, lows + 8 * scales), dim=-1).transpose(0, 1).contiguous()
        return cls(packed, scales_and_zeros.to(dtype), parts)

    @classmethod
    def quantize(cls, weight: torch.Tensor, parts: tuple[int, ...], dtype: torch.dtype) -> Int4Linear:
        return cls.from_codes(*quantize_int4(weight), parts, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        table = self.scales_and_zeros.to(x.dtype)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.packed, GROUP, table)
        return out.reshape(*x.shape[:-1], -1)


class Int8Embedding(nn.Module):
    """An embedding table in int8 rows with one scale per row (a tied int8 output head shares it)."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight)  # int8 [V, D]
        self.register_buffer("scales", scales)  # [V]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight[ids].to(self.scales.dtype) * self.scales[ids, None]


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes int8 [N, K] and scales [N] (float32): the largest magnitude of each row maps to 127."""
    weight = weight.float()
    scales = weight.abs().amax(dim=1).clamp_min(1e-12) / 127
    codes = torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return codes, scales


def quantize_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes [N, K] in 0..15, scales and lows [N, K / GROUP] (float32): each group's range in 15 steps."""
    rows, columns = weight.shape
    if columns % GROUP:
        raise ValueError(f"int4 weights need inputs in groups of {GROUP}; this layer has {columns}")
    groups = weight.float().reshape(rows, columns // GROUP, GROUP)
    lows, highs = groups.amin(dim=-1), groups.amax(dim=-1)
    scales = ((highs - lows) / 15).clamp_min(1e-12)
    codes = torch.round((groups - lows[..., None]) / scales[..., None]).clamp(0, 15).to(torch.int32)
    return codes.reshape(rows, columns), scales, lows


def nbytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers, each stored tensor once (tied ones share)."""
    seen, total = set(), 0
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


def quantize_model(model: nn.Module, form: str, dtype: torch.dtype) -> None:
    """Replace every linear layer of ``model`` by its ``form`` ("int8", "int4") counterpart and the
    embedding by int8 rows. A tied output head reads the embedding's int8 rows in either format: no
    bytes of its own, and int4 over a vocabulary-sized head costs more accuracy than it saves."""
    from models.llama import Linear

    if form not in FORMATS:
        raise ValueError(f"unknown weight format {form!r}; quantized formats: {', '.join(FORMATS)}")
    build = Int8Linear if form == "int8" else Int4Linear
    embedding = model.model.embed_tokens
    tied = model.lm_head.weight is embedding.weight
    codes, scales = quantize_int8(embedding.weight.data)
    model.model.embed_tokens = Int8Embedding(codes, scales.to(dtype))
    for name, module in list(model.named_modules()):
        if not isinstance(module, Linear):
            continue
        owner_name, _, attribute = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        rows, columns = module.weight.shape
        if tied and module is model.lm_head:
            replacement = Int8Linear(codes, model.model.embed_tokens.scales, module.parts)
        elif build is Int4Linear and (rows % INT4_ROWS or columns % GROUP):
            # The packed int4 kernel needs rows in 16s and inputs in groups of 32; this layer runs int8.
            replacement = Int8Linear.quantize(module.weight.data, module.parts, dtype)
        else:
            replacement = build.quantize(module.weight.data, module.parts, dtype)
        setattr(owner, attribute, replacement)
