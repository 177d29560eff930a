"""Chunked prefill on the default model (SmolLM2-135M-Instruct)."""

import pytest

import engine
from engine import PrefillConfig


@pytest.fixture(scope="module")
def llm(default_model_dir):
    return engine.load(default_model_dir)


@pytest.fixture(scope="module")
def ids(llm):
    text = "Long-context inference keeps a bounded memory of keys and values. " * 12
    return llm.tokenizer.encode_chat([{"role": "user", "content": text + "Summarise this."}])


@pytest.fixture(scope="module")
def one_shot(llm, ids):
    return llm.logits(ids)[-1]


@pytest.mark.parametrize("positions", ["compact", "original"])
@pytest.mark.parametrize("schedule", ["fixed", "imdc"])
def test_chunked_prefill_without_eviction_equals_one_shot(llm, ids, one_shot, schedule, positions):
    config = PrefillConfig(schedule=schedule, memory=64, chunk=64, positions=positions)
    result = llm.prefill(ids, config)
    assert len(result.steps) >= 3
    assert (result.logits[0] - one_shot).abs().max() <= 1e-4
