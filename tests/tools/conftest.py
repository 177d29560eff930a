"""Tiny synthetic Llama GGUF files, written with ``gguf.GGUFWriter`` the way llama.cpp's converter would."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

Q = gguf.GGMLQuantizationType

SHAPE = {"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "ffn": 96, "context": 256}
HEAD_DIM = SHAPE["hidden"] // SHAPE["heads"]
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
USER_DEFINED_TOKEN = "<tool_call>"
TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog. 12345 apples and 678 pears.",
    "def add(a, b):\n    return a + b  # adds two numbers\n",
    "Llamas live in the Andes; they're friendly, aren't they? Café, naïve, 東京.",
    "  indented line\n\tTabbed line\n\nparagraph after blank line 2024-06-30",
] * 8

# How each GGUF tensor kind is stored: several types, so that dequantization is exercised for each.
STORAGE = {
    "token_embd": Q.Q8_0,
    "output": Q.F16,
    "output_norm": Q.F32,
    "attn_norm": Q.F32,
    "ffn_norm": Q.F32,
    "attn_q": Q.Q4_1,
    "attn_k": Q.Q8_0,
    "attn_v": Q.F32,
    "attn_output": Q.BF16,
    "ffn_gate": Q.Q4_0,
    "ffn_up": Q.Q5_1,
    "ffn_down": Q.F16,
}


@dataclass
class TinyGGUF:
    path: Path
    hf_weights: dict[str, np.ndarray]  # Hugging Face names and layout, before quantization
    storage: dict[str, gguf.GGMLQuantizationType]  # Hugging Face name -> how the GGUF stores it
    tokens: list[str]
    options: dict = field(default_factory=dict)


def interleave_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's HF->GGUF q/k row order, written independently of the converter: per head, row i of
    the first half goes to row 2i and row i of the second half to row 2i+1."""
    out = np.empty_like(weight)
    head_dim = weight.shape[0] // num_heads
    half = head_dim // 2
    for head in range(num_heads):
        base = head * head_dim
        for i in range(half):
            out[base + 2 * i] = weight[base + i]
            out[base + 2 * i + 1] = weight[base + half + i]
    return out


def byte_level_vocabulary() -> tuple[list[str], list[str]]:
    """Token texts (specials first) and "left right" merges of a small byte-level BPE."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(CORPUS, trainer)
    model = json.loads(bpe.to_str())["model"]
    tokens = [*sorted(model["vocab"], key=model["vocab"].get), USER_DEFINED_TOKEN]
    merges = [" ".join(pair) if isinstance(pair, list) else pair for pair in model["merges"]]
    return tokens, merges


def _hf_shapes(vocab: int, tied: bool) -> dict[str, tuple[int, ...]]:
    hidden, ffn = SHAPE["hidden"], SHAPE["ffn"]
    kv_rows = SHAPE["kv_heads"] * HEAD_DIM
    shapes = {"token_embd": (vocab, hidden), "output_norm": (hidden,)}
    if not tied:
        shapes["output"] = (vocab, hidden)
    for layer in range(SHAPE["layers"]):
        shapes |= {
            f"blk.{layer}.attn_norm": (hidden,),
            f"blk.{layer}.attn_q": (hidden, hidden),
            f"blk.{layer}.attn_k": (kv_rows, hidden),
            f"blk.{layer}.attn_v": (kv_rows, hidden),
            f"blk.{layer}.attn_output": (hidden, hidden),
            f"blk.{layer}.ffn_norm": (hidden,),
            f"blk.{layer}.ffn_gate": (ffn, hidden),
            f"blk.{layer}.ffn_up": (ffn, hidden),
            f"blk.{layer}.ffn_down": (hidden, ffn),
        }
    return shapes


HF_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def hf_name(gguf_base: str) -> str:
    if gguf_base.startswith("blk."):
        _, layer, kind = gguf_base.split(".")
        return f"model.layers.{layer}.{HF_NAMES[kind]}.weight"
    return f"{HF_NAMES[gguf_base]}.weight"


def write_tiny_gguf(
    path: Path,
    *,
    arch: str = "llama",
    tied: bool = False,
    pre: str = "smollm",
    add_bos: bool = False,
    extra_tensors: tuple[str, ...] = (),
    seed: int = 0,
) -> TinyGGUF:
    rng = np.random.default_rng(seed)
    tokens, merges = byte_level_vocabulary()
    types = [3 if text in SPECIAL_TOKENS else 4 if text == USER_DEFINED_TOKEN else 1 for text in tokens]
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(SHAPE["layers"])
    writer.add_context_length(SHAPE["context"])
    writer.add_embedding_length(SHAPE["hidden"])
    writer.add_feed_forward_length(SHAPE["ffn"])
    writer.add_head_count(SHAPE["heads"])
    writer.add_head_count_kv(SHAPE["kv_heads"])
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(100000.0)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokens.index("<|im_start|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_pad_token_id(tokens.index("<|im_end|>"))
    writer.add_add_bos_token(add_bos)
    writer.add_chat_template(TEMPLATE)

    hf_weights, storage = {}, {}
    for base, shape in _hf_shapes(len(tokens), tied).items():
        kind = base.split(".")[-1]
        values = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        if len(shape) == 1:
            values += 1.0  # norm weights sit around one
        name = hf_name(base)
        hf_weights[name], storage[name] = values, STORAGE[kind]
        stored = values
        if kind in ("attn_q", "attn_k"):
            stored = interleave_rope_rows(values, SHAPE["heads"] if kind == "attn_q" else SHAPE["kv_heads"])
        qtype = STORAGE[kind]
        if qtype in (Q.F32, Q.F16):
            writer.add_tensor(f"{base}.weight", stored.astype(np.float16 if qtype == Q.F16 else np.float32))
        else:
            writer.add_tensor(f"{base}.weight", gguf.quants.quantize(stored, qtype), raw_dtype=qtype)
    for name in extra_tensors:
        writer.add_tensor(name, np.ones(SHAPE["hidden"], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    options = {"arch": arch, "tied": tied, "pre": pre, "add_bos": add_bos}
    return TinyGGUF(path, hf_weights, storage, tokens, options)


@pytest.fixture
def tiny_gguf(tmp_path: Path) -> Callable[..., TinyGGUF]:
    """``tiny_gguf(**options)`` writes a tiny GGUF into the test's temporary directory."""
    count = 0

    def make(**options) -> TinyGGUF:
        nonlocal count
        count += 1
        return write_tiny_gguf(tmp_path / f"tiny-{count}.gguf", **options)

    return make


@pytest.fixture(scope="session")
def interleave_rope() -> Callable[[np.ndarray, int], np.ndarray]:
    return interleave_rope_rows
