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


@pytest.mark.parametrize("key", ["61750", "29772", "95319"])
def test_pass_key_at_half_depth_is_retrieved_with_imdc_and_snapkv(llm, key):
    """A 5-digit key at 50% depth of ~1,500 tokens, memory 256 and chunk 256.

    Compression that does not know the question loses the key at this budget (later filler never
    looks back at it); scored by the question's attention, SnapKV keeps it, given a pooling window
    wide enough to keep a whole multi-token number (kernel 9).
    """
    from tools.eval_passkey import passkey_case

    case = passkey_case(llm.tokenizer, 1500, 0.5, key)
    config = PrefillConfig(
        schedule="imdc",
        policy="snapkv",
        memory=256,
        chunk=256,
        policy_args={"kernel": 9},
        query_window=case.question_tokens,
    )
    result = llm.prefill(case.ids, config)
    assert len(result.steps) == 6 and result.memory.kept() <= 256
    answer = llm.complete(result, case.ids, prefill=config, sampling=engine.GREEDY, max_tokens=12)
    assert case.key in answer.text
