"""REFORM: exact when everything is gathered, early exit, gathering by hand-built embeddings, pre-RoPE
embeddings, multi-turn gathering, documents beyond the window, and bad input."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import write_tiny_checkpoint

import backends
import engine
from engine import GREEDY, ChatSession, PrefillConfig, calibration, notices
from engine.calibration import CalibrationError, identity
from engine.reform import EmbeddingHeads, Reform, choose, read

IDS = torch.randint(3, 320, (300,), generator=torch.Generator().manual_seed(1)).tolist()
HEADS = [[1, "k", 0], [0, "q", 3], [1, "v", 1]]
SMALL = {"prefix": 8, "suffix": 8, "pool": 5, "reserve": 64, "query": 8}


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    directory = write_tiny_checkpoint(tmp_path_factory.mktemp("reform") / "ckpt", num_hidden_layers=3)
    model = engine.load(directory, backend="reference")
    data = {"format": calibration.FORMAT, "model": identity(model), "reform": {"heads": HEADS}}
    (directory / calibration.CHECKPOINT_FILE).write_text(json.dumps(data))
    return model


def test_with_everything_gathered_reform_equals_full_attention(llm):
    config = PrefillConfig(
        schedule="fixed", policy="h2o", memory=32, chunk=32, reform=Reform(gather=400, **SMALL)
    )
    completion = llm.generate(IDS, prefill=config, sampling=GREEDY, max_tokens=4)
    full = llm.generate(IDS, sampling=GREEDY, max_tokens=4)
    assert completion.reform.gathered == len(IDS)
    assert (completion.prefill.logits - full.prefill.logits).abs().max() <= 1e-4
    assert completion.token_ids == full.token_ids


def test_reading_runs_only_the_layers_up_to_the_highest_embedding_head(llm, monkeypatch):
    ran = []
    for index, layer in enumerate(llm.model.model.layers):
        forward = layer.forward
        monkeypatch.setattr(
            layer,
            "forward",
            lambda x, attend, index=index, forward=forward: ran.append(index) or forward(x, attend),
        )
    config = PrefillConfig(schedule="fixed", policy="h2o", memory=32, chunk=64, reform=Reform(**SMALL))
    reading = read(llm, IDS, config, config.reform)
    assert reading.heads.exit_layer == 1 and set(ran) == {0, 1}
    assert len(ran) == 2 * 5  # two layers for each of the 5 chunks; the third layer and the LM head never ran
    assert reading.embeddings.shape == (len(IDS), 3 * llm.config.head_dim)
    assert all(layer.length == 0 for layer in reading.memory.layers[2:])


def test_gathering_picks_the_best_span_widened_by_the_pool_with_prefix_and_suffix():
    length, width = 200, 4
    embeddings = torch.zeros(length, width)
    embeddings[:, 1] = 1.0  # every token points one way...
    embeddings[120, :] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # ...but one matches the question
    question = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    reform = Reform(gather=10 + 10 + 7, prefix=10, suffix=10, pool=7)
    index = choose(embeddings, question, reform, size=27).tolist()
    assert index == [*range(10), *range(117, 124), *range(190, 200)]  # the match, widened by 3 each side
    assert index == sorted(index)
    short = choose(embeddings[:20], question, reform, size=27)
    assert short.tolist() == list(range(20))  # a document no longer than the gather is taken whole


def test_ties_are_broken_by_position_so_gathering_is_deterministic():
    embeddings = torch.ones(50, 2)
    index = choose(embeddings, torch.ones(1, 2), Reform(gather=12, prefix=2, suffix=2, pool=3), size=12)
    assert index.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 48, 49]


def test_embeddings_do_not_depend_on_which_chunk_read_the_token(llm):
    reform = Reform(**SMALL)
    early = read(llm, IDS, PrefillConfig(schedule="fixed", policy="none", chunk=100, reform=reform), reform)
    late = read(llm, IDS, PrefillConfig(schedule="fixed", policy="none", chunk=37, reform=reform), reform)
    # Token 99 closes the first chunk of one and sits inside the third chunk of the other.
    assert (early.embeddings.float() - late.embeddings.float()).abs().max() <= 2e-3


def test_pre_rope_embeddings_of_the_first_layer_ignore_the_position(llm):
    heads = EmbeddingHeads(((0, "q", 0), (0, "k", 1)), llm.config.head_dim)
    stores = []
    for offset in (0, 57):  # the same tokens read from original position 0, or from position 57
        store = torch.zeros(len(IDS), heads.width, dtype=torch.float16)
        memory = llm.new_memory(PrefillConfig(sinks=0))
        memory.seen = offset
        config = PrefillConfig(positions="original")
        llm.prefill(IDS, config, memory=memory, layers=1, tap=heads.writer(store, offset))
        assert int(memory.layers[0].positions.min()) == offset
        stores.append(store)
    assert torch.equal(stores[0], stores[1])


def test_each_turn_gathers_for_its_own_question(llm):
    document = " ".join(f"Fact {n}: the code for item {n} is {1000 + n}." for n in range(120))
    config = PrefillConfig(
        schedule="fixed", policy="h2o", memory=32, chunk=64, reform=Reform(gather=120, **SMALL)
    )
    session = ChatSession(llm, prefill=config, sampling=GREEDY, document=document)
    first = session.ask("What is the code for item 3?", max_tokens=3, progress=False)
    second = session.ask("And for item 97?", max_tokens=3, progress=False)
    assert first.reform.read_seconds > 0 and second.reform.read_seconds == 0.0
    assert first.reform.gathered == second.reform.gathered == 120
    assert session.reading.memory.seen == len(
        session.reading.ids
    )  # the questions left the reading memory alone
    # The second cache holds the gathered document, then the whole conversation after it.
    tail = session.conversation
    assert second.memory.seen == 120 + len(tail)  # every answer token was fed back as well


def test_a_document_beyond_the_window_is_read_and_answered_within_it(llm):
    document = "Long context inference keeps a bounded memory of keys and values. " * 200
    config = PrefillConfig(schedule="imdc", policy="h2o", memory=64, chunk=64, reform=Reform(**SMALL))
    session = ChatSession(llm, prefill=config, sampling=GREEDY, document=document)
    completion = session.ask("What is kept?", max_tokens=3, progress=False)
    window = llm.config.max_position_embeddings
    assert completion.reform.document_tokens > 2 * window
    assert completion.reform.gathered == window - SMALL["reserve"]
    assert completion.memory.seen < window


def test_bad_reform_settings_are_refused_clearly(llm, tmp_path):
    with pytest.raises(
        ValueError, match=r"gather=100 must be a number of tokens larger than prefix \+ suffix"
    ):
        Reform(gather=100, prefix=64, suffix=64)
    with pytest.raises(ValueError, match="pool must be odd"):
        Reform(pool=128)
    with pytest.raises(ValueError, match="leaves -512 tokens"):
        Reform().gather_size(512)
    other = tmp_path / "other.json"
    model = {**identity(llm), "layers": 30, "heads": 9}
    other.write_text(json.dumps({"format": calibration.FORMAT, "model": model, "reform": {"heads": HEADS}}))
    config = PrefillConfig(schedule="fixed", chunk=64, memory=32, reform=Reform(heads=str(other), **SMALL))
    with pytest.raises(
        CalibrationError, match=r"made for another model .*layers 30 \(this model: 3\).*tools.find_heads"
    ):
        llm.generate(IDS, prefill=config, max_tokens=1)
    with pytest.raises(ValueError, match="REFORM gathers from a document"):
        ChatSession(llm, prefill=config)


def test_a_model_without_calibration_names_the_command(tmp_path):
    model = engine.load(write_tiny_checkpoint(tmp_path / "bare"), backend="reference")
    config = PrefillConfig(schedule="fixed", chunk=64, memory=32, reform=Reform(**SMALL))
    with pytest.raises(
        CalibrationError,
        match=rf"no head calibration for bare: run `python -m tools.find_heads -m {tmp_path / 'bare'}`",
    ):
        model.generate(IDS, prefill=config, max_tokens=1)


class NoStatistics(backends.reference.ReferenceBackend):
    name = "no_statistics"

    def supports(self, spec):
        return not spec.stats


def test_a_backend_without_statistics_falls_back_with_one_note(
    tmp_path, capsys, llm, monkeypatch, registered
):
    registered(backends, "no_statistics", NoStatistics)
    monkeypatch.setattr(notices, "_said", set())
    model = engine.load(llm.path, backend="no_statistics")
    config = PrefillConfig(schedule="fixed", policy="h2o", chunk=64, memory=32, reform=Reform(**SMALL))
    model.generate(IDS, prefill=config, max_tokens=1)
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1
    assert (
        notes[0].startswith("note: backend 'no_statistics' does not support")
        and "with statistics" in notes[0]
    )
