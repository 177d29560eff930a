"""Logits parity with Hugging Face transformers (the independent oracle), in float32."""

import pytest
import torch
from tiny import hf_logits, write_tiny_checkpoint

import engine

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}  # fmt: skip
VARIANTS = {
    "llama-gqa": ("llama", {}),
    "llama-mha": ("llama", {"num_key_value_heads": 4}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "llama3-rope-scaling": ("llama", {"rope_scaling": LLAMA3}),
    "llama-linear-rope": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
    "llama-head-dim-24": ("llama", {"head_dim": 24}),
    "llama-group-3": ("llama", {"num_attention_heads": 6, "num_key_value_heads": 2, "hidden_size": 96}),
    "mistral-window-7": ("mistral", {"sliding_window": 7}),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def checkpoint(request, tmp_path_factory):
    architecture, overrides = VARIANTS[request.param]
    return write_tiny_checkpoint(tmp_path_factory.mktemp(request.param) / "ckpt", architecture, **overrides)


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_logits_match_transformers(checkpoint, backend):
    ids = torch.randint(0, 320, (96,), generator=torch.Generator().manual_seed(1)).tolist()
    ours = engine.load(checkpoint, backend=backend).logits(ids)
    reference = hf_logits(checkpoint, ids)
    assert ours.shape == reference.shape
    assert (ours - reference).abs().max() <= 1e-4


def test_default_model_matches_transformers(default_model_dir):
    llm = engine.load(default_model_dir)
    ids = llm.tokenizer.encode_chat([{"role": "user", "content": "What is the capital of France? Explain."}])
    ours = llm.logits(ids)
    reference = hf_logits(default_model_dir, ids)
    assert (ours - reference).abs().max() <= 1e-4
    assert torch.equal(ours.argmax(-1), reference.argmax(-1))


def test_float16_weights_stay_close_to_float32(tmp_path):
    directory = write_tiny_checkpoint(tmp_path / "ckpt")
    ids = torch.randint(0, 320, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    exact = engine.load(directory)
    narrow = engine.load(directory, weight_dtype="float16")
    assert narrow.model.model.layers[0].self_attn.qkv_proj.weight.dtype == torch.float16
    assert narrow.model.model.norm.weight.dtype == torch.float32
    # Prefill rows widen the weights; one decode row multiplies in float16: both stay close.
    assert (narrow.logits(ids) - exact.logits(ids)).abs().max() < 0.05
    steps = (exact.generate(ids, sampling=engine.GREEDY, max_tokens=6, ignore_eos=True),
             narrow.generate(ids, sampling=engine.GREEDY, max_tokens=6, ignore_eos=True))  # fmt: skip
    assert steps[0].token_ids == steps[1].token_ids
