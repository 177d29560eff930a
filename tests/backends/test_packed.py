"""A two-tier memory read as stored (``Packed``): every backend that ``reads_packed`` against the
reference on the same memory dequantized, by the suite's rule (FlashAttention's: at most twice the
error of plain attention in the inputs' dtype, plus 1e-5)."""

from __future__ import annotations

import pytest
import torch

import backends
from backends import Packed
from engine.cache import LayerMemory
from engine.kv_quant import KVCodec
from tools.check_backends import compare, plain_attention, upcast


def packed_memory(bits: int, dtype: torch.dtype, head_dim: int, group: int, device: str) -> tuple:
    """A decode query and a memory of 3 KV heads of different lengths, some of each head's entries
    demoted (the sinks and the newest stay at full precision), as a layer of the engine holds it."""
    generator = torch.Generator().manual_seed(bits * 10 + head_dim)
    kv_heads, length = 3, 70
    keys, values = torch.randn(2, 1, kv_heads, length, head_dim, generator=generator)
    queries = torch.randn(1, kv_heads * group, length, head_dim, generator=generator)
    layer = LayerMemory(1, kv_heads, head_dim, dtype, torch.device(device), low=KVCodec(bits, head_dim))
    layer.append(*(t.to(device, dtype) for t in (keys, keys, values)), torch.arange(length, device=device),
                 queries.to(device, dtype))  # fmt: skip
    layer.keep([torch.arange(60), torch.arange(0, 50, 2), torch.arange(5, 70)])
    start = layer.offsets
    demoted = [
        start[0] + torch.arange(4, 40),
        start[1] + torch.arange(4, 20),
        start[2] + torch.arange(10, 64, 3),
    ]
    layer.demote(torch.cat(demoted).to(device))
    newest = [t[:, :, :1].to(device, dtype) for t in (keys, keys, values)]
    layer.append(*newest, torch.tensor([length], device=device))
    q = torch.randn(1, kv_heads * group, 1, head_dim, generator=generator).to(device, dtype)
    return q, layer


def readers() -> list[str]:
    found = []
    for name in backends.available():
        if name == "auto":
            continue
        try:
            backend = backends.get(name)
        except ImportError:
            continue
        if backend.reads_packed:
            found.append(name)
    return found


@pytest.mark.parametrize("name", readers())
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize(("dtype", "head_dim", "group"), [(torch.float32, 64, 3), (torch.bfloat16, 32, 2),
                                                          (torch.float16, 16, 1)])  # fmt: skip
def test_a_packed_memory_decodes_as_its_dequantized_self(name, bits, dtype, head_dim, group, device):
    q, layer = packed_memory(bits, dtype, head_dim, group, device)
    packed = layer.packed()
    assert isinstance(packed, Packed) and packed.low_keys.shape[0] > 0 and packed.high_keys.shape[0] > 0
    segments = packed.segments()
    result = backends.get(name).decode(q, packed, None)
    reference = backends.get("reference").decode(q.float(), upcast(segments), None)
    plain_out, plain_lse, _ = plain_attention(q, segments, None)
    for check in (compare("out", result.out, reference.out, plain_out),
                  compare("lse", result.lse, reference.lse, plain_lse)):  # fmt: skip
        assert check.passed, check


def test_dequantized_a_packed_memory_is_what_the_memory_reads(device):
    """One rule for both: the engine's own reads of a two-tier memory and ``Packed.segments``."""
    _, layer = packed_memory(3, torch.float32, 64, 3, device)
    segments = layer.packed().segments()
    for s, (offset, length) in enumerate(zip(segments.offsets, segments.lengths, strict=True)):
        assert torch.equal(segments.keys[offset : offset + length], layer.segment(s, "rotated"))
        assert torch.equal(segments.values[offset : offset + length], layer.segment(s, "values"))
    low = layer.flat("low")[layer._entries()]
    assert 0 < int(low.sum()) < low.numel()  # both tiers are read
