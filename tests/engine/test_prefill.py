"""Chunked prefill into a compressed memory, on tiny random checkpoints."""

import threading

import pytest
import torch
from tiny import write_calibration, write_tiny_checkpoint

import engine
import policies
from engine import GREEDY, PrefillConfig, notices, peak_memory
from engine.attention import PrefillCancelled
from policies import PolicyError
from schedules import Step

IDS = torch.randint(3, 320, (90,), generator=torch.Generator().manual_seed(0)).tolist()


@pytest.fixture(scope="module", params=["llama", "mistral"])
def llm(request, tmp_path_factory):
    overrides = {"sliding_window": 20} if request.param == "mistral" else {}
    directory = write_tiny_checkpoint(
        tmp_path_factory.mktemp(request.param) / "ckpt", request.param, **overrides
    )
    llm = engine.load(directory, backend="reference")
    write_calibration(llm)
    return llm


@pytest.mark.parametrize("positions", ["compact", "original"])
@pytest.mark.parametrize("schedule", ["fixed", "im", "imdc"])
def test_chunked_prefill_without_eviction_equals_one_shot(llm, schedule, positions):
    one_shot = llm.logits(IDS)[-1]
    memory = len(IDS) if schedule == "fixed" else 17  # imdc needs M close to c; "none" keeps all anyway
    config = PrefillConfig(schedule=schedule, policy="none", memory=memory, chunk=17, positions=positions)
    result = llm.prefill(IDS, config)
    assert len(result.steps) > 1 and sum(step.chunk for step in result.steps) == len(IDS)
    assert (result.logits[0] - one_shot).abs().max() <= 1e-4
    if schedule == "fixed":  # a fixed budget of at least L is never reached: nothing is evicted
        config = PrefillConfig(
            schedule=schedule, policy="snapkv", memory=len(IDS), chunk=17, positions=positions
        )
        assert (llm.prefill(IDS, config).logits[0] - one_shot).abs().max() <= 1e-4


@pytest.mark.parametrize("name", sorted(set(policies.available()) - {"none"}))
@pytest.mark.parametrize("positions", ["compact", "original"])
def test_every_policy_keeps_memory_within_budget_and_in_order(llm, name, positions):
    config = PrefillConfig(schedule="fixed", policy=name, memory=12, chunk=16, sinks=3, positions=positions)
    result = llm.prefill(IDS, config)
    policy = config.build_policy()
    policy.prepare(llm.model_facts())
    for index, layer in enumerate(result.memory.layers):
        budget = policy.layer_budget(12, index, len(result.memory.layers))
        heads = layer.segments
        if policy.head_wise:  # heads share the layer's budget; one may keep more than another
            assert sum(layer.lengths) <= heads * (3 + budget)
        else:
            assert layer.length <= 3 + budget
        for segment in range(heads):
            positions_kept = layer.segment(segment, "positions")
            assert (positions_kept[:3] == torch.arange(3)).all(), "sinks are kept first"
            assert (positions_kept.diff() > 0).all(), "kept tokens stay in original order"
            keys = layer.segment(segment, "keys")
            expected = torch.arange(len(keys)) if positions == "compact" else positions_kept
            rotated = llm.rope.rotate(keys, expected)
            high = ~layer.segment(segment, "low")  # a low tier's rotated keys are quantized on their own
            assert torch.allclose(layer.segment(segment, "rotated")[high], rotated[high], atol=1e-6)
            assert torch.allclose(layer.segment(segment, "rotated"), rotated, atol=0.5)
    assert all(step.memory <= 2 * 12 * (3 if policy.head_wise else 1) for step in result.steps)


def test_step_stats_follow_the_schedule(llm):
    config = PrefillConfig(schedule="imdc", policy="streaming", memory=24, chunk=24)
    result = llm.prefill(IDS, config)
    plan = config.build_schedule().plan(len(IDS))
    assert [s.chunk for s in result.steps] == [s.chunk for s in plan]
    assert [s.memory for s in result.steps] == [min(s.memory, sum(p.chunk for p in plan[: i + 1]) - 4)
                                                for i, s in enumerate(plan)]  # fmt: skip
    assert all(s.seconds > 0 and s.peak_bytes > 0 for s in result.steps)


def test_prefill_continues_an_existing_memory(llm):
    whole = llm.prefill(IDS, PrefillConfig(schedule="fixed", chunk=16))
    first = llm.prefill(IDS[:50], PrefillConfig(schedule="fixed", chunk=16))
    rest = llm.prefill(IDS[50:], PrefillConfig(schedule="fixed", chunk=16), memory=first.memory)
    assert rest.memory.seen == len(IDS)
    assert (rest.logits - whole.logits).abs().max() <= 1e-4


def test_continuing_never_squeezes_memory_below_the_budget():
    config = PrefillConfig(schedule="im", memory=64, chunk=8)
    assert [s.memory for s in config.plan(32, held=64)] == [64, 64, 64, 64]
    assert [s.memory for s in config.plan(32)] == [16, 32, 48, 64]


def test_a_short_later_turn_is_appended_without_eviction_within_memory_plus_chunk():
    config = PrefillConfig(schedule="imdc", policy="snapkv", memory=64, chunk=16)
    assert config.plan(10, held=64) == [Step(10, None)]  # a question after the document
    assert config.plan(10, held=70) == [Step(10, None)]  # 80 = M + c: still within the span
    assert config.plan(10, held=71) == [Step(10, 64)]  # past M + c: back to M
    assert [s.memory for s in config.plan(40, held=10)] == [64, 64, 64]  # longer than a chunk


def test_naming_a_policy_without_a_schedule_compresses_with_imdc():
    assert PrefillConfig(policy="snapkv").schedule == "imdc"
    assert PrefillConfig().schedule == "full"
    assert PrefillConfig(schedule="fixed").schedule == "fixed"
    # Compressing only while generating is a real use of 'full' with a policy.
    assert PrefillConfig(schedule="full", policy="streaming", decode_memory=64).schedule == "full"
    with pytest.raises(
        ValueError, match="schedule 'full' keeps every token, so policy 'snapkv' would never run"
    ):
        PrefillConfig(schedule="full", policy="snapkv", memory=64, chunk=64)


def test_a_sparse_start_is_noted_once(capsys, monkeypatch):
    monkeypatch.setattr(notices, "_said", set())
    config = PrefillConfig(schedule="im", policy="streaming", memory=256, chunk=256)
    assert min(s.memory for s in config.plan(70_000)) >= 1
    config.plan(70_000)
    notes = capsys.readouterr().err.splitlines()
    assert len(notes) == 1 and notes[0].startswith("note: im keeps only 1 of the first 256 tokens")
    PrefillConfig(schedule="im", policy="streaming", memory=1024, chunk=1024).plan(32_768)  # 32 of 1024: fine
    assert capsys.readouterr().err == ""


def test_generation_after_chunked_prefill_matches_one_shot(llm):
    one_shot = llm.generate(IDS, sampling=GREEDY, max_tokens=8)
    chunked = llm.generate(
        IDS, prefill=PrefillConfig(schedule="fixed", chunk=13), sampling=GREEDY, max_tokens=8
    )
    assert chunked.token_ids == one_shot.token_ids and len(one_shot.token_ids) > 0


def test_decode_budget_bounds_memory_during_generation(llm):
    config = PrefillConfig(schedule="fixed", policy="streaming", memory=16, chunk=16, decode_memory=20)
    completion = llm.generate(IDS, prefill=config, sampling=GREEDY, max_tokens=60)
    slack = max(16, 20 // 8)
    assert completion.memory.seen == len(IDS) + len(completion.token_ids)
    assert all(layer.length <= 4 + 20 + slack for layer in completion.memory.layers)
    streaming = PrefillConfig(schedule="fixed", policy="streaming", memory=16, chunk=16)
    unbounded = llm.generate(IDS, prefill=streaming, sampling=GREEDY, max_tokens=60)
    assert unbounded.memory.kept() == 16 + len(unbounded.token_ids)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"chunk": 0}, "chunk must be a positive number of tokens"),
        ({"memory": -1}, "memory must be a non-negative number of tokens"),
        ({"sinks": -2}, "sinks must be a non-negative"),
        ({"positions": "absolute"}, "positions must be one of compact, original"),
        ({"schedule": "weekly"}, "unknown schedule 'weekly'; known: .*imdc"),
        ({"policy": "oracle"}, "unknown policy 'oracle'; known: .*snapkv"),
        ({"policy": "snapkv", "policy_args": {"windw": 3}}, "has no option windw; options: window, kernel"),
        ({"decode_memory": -5}, "decode_memory must be a non-negative"),
    ],
)
def test_bad_prefill_settings_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        PrefillConfig(**options)


def test_empty_prompt_is_refused(llm):
    with pytest.raises(ValueError, match="the prompt is empty"):
        llm.prefill([])


@pytest.mark.parametrize("positions", ["compact", "original"])
def test_query_window_observers_leave_no_trace(llm, positions):
    """The question run after each chunk only observes: without eviction the result is the plain one."""
    plain = llm.prefill(IDS, PrefillConfig(schedule="fixed", chunk=16, positions=positions))
    aware = llm.prefill(IDS, PrefillConfig(schedule="fixed", chunk=16, positions=positions, query_window=10))
    assert (aware.logits - plain.logits).abs().max() <= 1e-4
    assert aware.memory.seen == len(IDS)
    for layer in aware.memory.layers:
        assert layer.length == len(IDS) and torch.equal(layer.positions[0, 0], torch.arange(len(IDS)))


def test_query_window_changes_what_is_kept(llm):
    """Scored by the question's attention, the memory keeps other tokens than question-agnostic scoring."""
    agnostic = PrefillConfig(
        schedule="fixed", policy="snapkv", memory=12, chunk=16, policy_args={"window": 4}
    )
    aware = PrefillConfig(
        schedule="fixed", policy="snapkv", memory=12, chunk=16, policy_args={"window": 4}, query_window=9
    )
    kept = [
        torch.cat([layer.positions for layer in llm.prefill(IDS, config).memory.layers])
        for config in (agnostic, aware)
    ]
    assert kept[0].shape == kept[1].shape and not torch.equal(kept[0], kept[1])
    assert (kept[1] < len(IDS)).all()


def memory_state(memory):
    return memory.seen, [
        (layer.keys.clone(), layer.rotated.clone(), layer.values.clone(), layer.positions.clone())
        for layer in memory.layers
    ]


def assert_same_memory(memory, state):
    seen, layers = state
    assert memory.seen == seen
    for layer, saved in zip(memory.layers, layers, strict=True):
        current = (layer.keys, layer.rotated, layer.values, layer.positions)
        assert all(torch.equal(a, b) for a, b in zip(current, saved, strict=True))


class CancelsMidway(policies.Policy):
    """Streaming, but sets the test's cancel event at its third selection (mid-prefill)."""

    cancel = None

    def __init__(self) -> None:
        self.calls = 0

    def score(self, candidates):
        self.calls += 1
        if self.calls == 3:
            type(self).cancel.set()
        return candidates.positions.float()


@pytest.mark.parametrize("policy", ["cancels_at_third_selection", "none"])
def test_a_cancelled_prefill_puts_the_memory_back(llm, policy, registered):
    registered(policies, "cancels_at_third_selection", CancelsMidway)
    config = PrefillConfig(schedule="fixed", policy=policy, memory=16, chunk=16)
    first = llm.prefill(IDS[:40], PrefillConfig(schedule="fixed", policy="streaming", memory=16, chunk=16))
    before = memory_state(first.memory)
    cancel = threading.Event()
    CancelsMidway.cancel = cancel
    if policy == "none":
        cancel.set()  # appending only: cancelled at the first layer
    with pytest.raises(PrefillCancelled):
        llm.prefill(IDS[40:], config, memory=first.memory, cancel=cancel)
    assert_same_memory(first.memory, before)
    # The memory works on as if the cancelled call never happened.
    streaming = PrefillConfig(schedule="fixed", policy="streaming", memory=16, chunk=16)
    again = llm.prefill(IDS[40:], streaming, memory=first.memory)
    control = llm.prefill(IDS[40:], streaming, memory=llm.prefill(IDS[:40], streaming).memory)
    assert torch.equal(again.logits, control.logits)


def test_a_cancelled_turn_leaves_the_conversation_as_it_was(llm):
    session = engine.ChatSession(
        llm, prefill=PrefillConfig(schedule="fixed", policy="streaming", memory=16, chunk=16), sampling=GREEDY
    )
    session.ask("hello there", max_tokens=3, progress=False)
    before = (
        list(session.messages),
        session.memory_text,
        list(session.history),
        memory_state(session.memory),
    )
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(PrefillCancelled):
        session.ask("a second question that is never read", max_tokens=3, cancel=cancel, progress=False)
    assert (session.messages, session.memory_text, session.history) == before[:3]
    assert_same_memory(session.memory, before[3])


class OneHeadForAll(policies.Policy):
    """Returns head 0's choice as [B, 1, k]: would broadcast over every KV head if unchecked."""

    def select(self, candidates, budget):
        return torch.arange(budget)[None, None, :]


def test_a_selection_must_have_every_kv_head(llm, registered):
    registered(policies, "one_head_for_all", OneHeadForAll)
    config = PrefillConfig(schedule="fixed", policy="one_head_for_all", memory=8, chunk=16)
    with pytest.raises(PolicyError, match=r"shape \(1, 1, 8\); expected int64 \[1, 2, k\]"):
        llm.prefill(IDS, config)


@pytest.mark.parametrize("ids", [[5, 320, 7], [5, -1, 7], [10**9]])
def test_token_ids_outside_the_vocabulary_are_refused(llm, ids):
    with pytest.raises(ValueError, match="outside the model's vocabulary of 320"):
        llm.prefill(ids)


def test_a_prompt_larger_than_free_memory_is_refused_before_work(llm, monkeypatch):
    monkeypatch.setattr(peak_memory, "available_bytes", lambda device: 20_000)
    with pytest.raises(
        peak_memory.NotEnoughMemoryError, match="reading 90 tokens with schedule full needs about"
    ):
        llm.prefill(IDS)
    monkeypatch.setattr(peak_memory, "available_bytes", lambda device: 10**9)
    llm.prefill(IDS)
