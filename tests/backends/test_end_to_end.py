"""The default model end to end: Triton kernels (interpreted on a CPU) against the reference backend."""

import pytest
import torch

import engine
from engine import GREEDY, PrefillConfig

pytest.importorskip("triton")

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
COMPRESSED = PrefillConfig(schedule="imdc", policy="snapkv", memory=12, chunk=16, policy_args={"window": 4})


@pytest.mark.slow
def test_triton_and_reference_answer_and_keep_the_same(default_model_dir):
    runs = {}
    for backend in ("reference", "triton"):
        llm = engine.load(default_model_dir, backend=backend)
        setup = llm.attention_setup(COMPRESSED.build_policy())
        assert setup.backend.name == backend, "triton must run (interpreted), not fall back"
        completion = llm.chat(QUESTION, prefill=COMPRESSED, sampling=GREEDY, max_tokens=8)
        kept = [layer.positions[:, :, :].clone() for layer in completion.prefill.memory.layers]
        runs[backend] = (completion, kept)
    (reference, reference_kept), (triton, triton_kept) = runs["reference"], runs["triton"]
    assert len(reference.prefill.steps) >= 3
    assert triton.token_ids == reference.token_ids and "Paris" in reference.text
    for layer, (a, b) in enumerate(zip(reference_kept, triton_kept, strict=True)):
        assert torch.equal(a, b), f"layer {layer} kept different tokens"
