"""A conversation over one memory: later turns are prefilled against it, never rebuilt."""

import pytest
from tiny import write_tiny_checkpoint

import engine
from engine import GREEDY, ChatSession, PrefillConfig


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return engine.load(write_tiny_checkpoint(tmp_path_factory.mktemp("session") / "ckpt"))


def test_turns_extend_one_memory(llm):
    session = ChatSession(llm, sampling=GREEDY, system_prompt="Be brief.")
    first = session.ask("hello there", max_tokens=6)
    memory = session.memory
    second = session.ask("and again", max_tokens=6)
    assert session.memory is memory, "the second turn reuses the first turn's memory"
    assert memory.seen == len(session.history)
    expected = llm.tokenizer.render_chat(session.messages[:-1], add_generation_prompt=True)
    assert session.memory_text.startswith(expected)
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert session.turns == [first, second]


def test_without_compression_a_later_turn_equals_a_fresh_prefill(llm):
    session = ChatSession(llm, sampling=GREEDY)
    session.ask("hello there", max_tokens=6)
    second = session.ask("and again", max_tokens=6)
    fresh = llm.prefill(session.history[: -len(second.token_ids)])
    assert (fresh.logits - second.prefill.logits).abs().max() <= 1e-4


def test_document_is_read_once_and_compressed(llm):
    document = "Long context inference keeps a bounded memory of keys and values. " * 40
    config = PrefillConfig(schedule="imdc", policy="snapkv", memory=48, chunk=48)
    session = ChatSession(llm, prefill=config, sampling=GREEDY, document=document)
    read = session.read_document(progress=False)
    assert len(read.steps) > 3 and read.memory.kept() <= 48
    session.ask("what is this about?", max_tokens=4)
    assert (
        session.messages[0]["content"].startswith(document)
        and "what is this about?" in session.messages[0]["content"]
    )
    session.ask("anything else?", max_tokens=4)
    assert session.memory.seen == len(session.history)


def test_reset_forgets_everything(llm):
    session = ChatSession(llm, sampling=GREEDY, system_prompt="Be brief.")
    session.ask("hello", max_tokens=3)
    session.reset()
    assert session.memory is None and session.turns == [] and session.messages[0]["role"] == "system"
