"""Llama: RMSNorm, rotate-half RoPE, grouped-query attention, SwiGLU MLP.

Module names mirror Hugging Face checkpoints, except that q/k/v and gate/up projections are fused
(``packed_modules``: one matmul instead of three or two). Attention itself is not computed here:
each layer hands its pre-RoPE q, k, v to an ``attend`` callback, which owns positions, the KV
memory, the backend and compression (see engine/attention.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ModelConfig
from models import register

# attend(layer_index, q, k, v) -> attention output; q [B, Hq, L, D], k and v [B, Hkv, L, D], all pre-RoPE.
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class Linear(nn.Module):
    """A bias-free linear layer whose weight may be stored narrower than the activations.

    With a narrower weight, matrix-vector products (decode) read it as is: they are bound by reading
    weights, and half the bytes is nearly half the time. Matrix-matrix products (prefill) are bound by
    arithmetic, which CPUs do faster in the activations' dtype, so the weight is widened first.
    """

    def __init__(self, in_features: int, *parts: int) -> None:
        super().__init__()
        self.parts = parts  # output sizes of the checkpoint tensors fused here, in order
        self.weight = nn.Parameter(torch.empty(sum(parts), in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if weight.dtype == x.dtype:
            return F.linear(x, weight)
        if x.shape[:-1].numel() == 1:
            return F.linear(x.to(weight.dtype), weight).to(x.dtype)
        return F.linear(x, weight.to(x.dtype))


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        kv_size = self.kv_heads * self.head_dim
        self.qkv_proj = Linear(config.hidden_size, self.heads * self.head_dim, kv_size, kv_size)
        self.o_proj = Linear(self.heads * self.head_dim, config.hidden_size)

    def forward(self, x: torch.Tensor, attend: Callable[..., torch.Tensor]) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k, v = self.qkv_proj(x).split(self.qkv_proj.parts, dim=-1)
        q = q.view(batch, length, self.heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
        out = attend(q, k, v)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, self.heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = Linear(config.hidden_size, config.intermediate_size, config.intermediate_size)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, attend: Callable[..., torch.Tensor]) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), attend)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


@register("LlamaForCausalLM")
class LlamaForCausalLM(nn.Module):
    # Checkpoint projections stored fused (one matmul instead of three, or two): the checkpoint
    # module's name -> (our module's name, index of its part).
    packed_modules: ClassVar[dict[str, tuple[str, int]]] = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.sliding_window: int | None = None
        self.model = Decoder(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding with the output head when the config says so (again after ``to_empty``)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self, ids: torch.Tensor, attend: Attend, *, all_logits: bool = False, layers: int | None = None
    ) -> torch.Tensor | None:
        """Float32 logits of the last position [B, V], or of every position [B, L, V]. With ``layers``,
        only the first ``layers`` decoder layers run (an early exit) and nothing is returned."""
        # Activations run in the norms' dtype; the embedding may be stored narrower (weight_dtype).
        x = self.model.embed_tokens(ids).to(self.model.norm.weight.dtype)
        for index, layer in enumerate(self.model.layers[:layers]):
            x = layer(x, lambda q, k, v, index=index: attend(index, q, k, v))
        if layers is not None:
            return None
        x = self.model.norm(x if all_logits else x[:, -1])
        return self.lm_head(x).float()
