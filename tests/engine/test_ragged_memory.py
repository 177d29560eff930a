"""Memory with per-head lengths, through the engine: heads of different lengths read, append, decode,
shrink and persist as they should."""

import json

import pytest
import torch
from tiny import write_calibration, write_tiny_checkpoint

import engine
from engine import GREEDY, PrefillConfig
from engine.attention import MemoryAttention
from engine.cache import LayerMemory
from engine.calibration import CalibrationError
from policies import PolicyError

IDS = torch.randint(3, 320, (90,), generator=torch.Generator().manual_seed(1)).tolist()


@pytest.fixture(scope="module", params=["reference", "sdpa"])
def llm(request, tmp_path_factory):
    directory = write_tiny_checkpoint(
        tmp_path_factory.mktemp("ragged") / "ckpt", "mistral", sliding_window=40
    )
    llm = engine.load(directory, backend=request.param)
    write_calibration(llm)
    return llm


def test_a_ragged_layout_reads_as_the_one_shot_prefill(llm):
    """Heads whose entries sit in segments of different room take the per-head path; with nothing
    evicted they must still give one-shot attention."""
    assert_ragged_layout_reads_as_one_shot(llm)


def test_the_triton_kernels_read_a_ragged_layout_as_the_one_shot_prefill(tmp_path):
    directory = write_tiny_checkpoint(tmp_path / "ckpt", "mistral", sliding_window=40)
    llm = engine.load(directory, backend="triton")
    write_calibration(llm)
    assert_ragged_layout_reads_as_one_shot(llm)


def assert_ragged_layout_reads_as_one_shot(llm) -> None:
    one_shot = llm.logits(IDS)[-1]
    config = PrefillConfig(schedule="fixed", chunk=16)
    first = llm.prefill(IDS[:40], config)
    for layer in first.memory.layers:
        layer.reserve([layer.room[0] + 7 * (segment + 1) for segment in range(layer.segments)])
        assert not layer.uniform
    rest = llm.prefill(IDS[40:], config, memory=first.memory)  # every chunk on the per-head path
    assert (rest.logits[0] - one_shot).abs().max() <= 1e-4
    one_shot_tokens = llm.generate(IDS, sampling=GREEDY, max_tokens=6).token_ids
    completion = llm.complete(rest, IDS, sampling=GREEDY, max_tokens=6)
    assert completion.token_ids == one_shot_tokens


def razor(recent: int) -> PrefillConfig:
    return PrefillConfig(
        schedule="fixed", policy="razor", memory=24, chunk=16, sinks=4,
        policy_args={"induction": 0.5, "echo": 0.0, "recent": recent},
    )  # fmt: skip


def test_per_head_lengths_survive_compression_append_and_decode(llm):
    completion = llm.generate(IDS, prefill=razor(recent=6), sampling=GREEDY, max_tokens=5, ignore_eos=True)
    retrieval = llm.model_facts().head_table("razor", "induction").flatten().topk(2).indices
    for index, layer in enumerate(completion.memory.layers):
        expected = [
            4 + (24 if index * layer.segments + head in retrieval else 6 + 1) + 5
            for head in range(layer.segments)
        ]
        assert layer.lengths == expected
        assert layer.nbytes >= sum(layer.lengths) * layer.entry_bytes()
    assert completion.memory.seen == len(IDS) + 5


def test_a_decode_step_rotates_each_head_from_its_own_length(llm):
    """A decode step looks up every layer's angles at its first layer: each layer must still rotate
    its KV heads' new rows at their own lengths, a layer changed since that lookup included."""
    config = razor(recent=6)
    memory = llm.prefill(IDS, config).memory
    first, last = memory.layers[0], memory.layers[-1]
    first.truncate([length - 1 - head for head, length in enumerate(first.lengths)])
    assert first.lengths != last.lengths  # else reading another layer's angles would pass
    setup = llm.attention_setup(config.build_policy(), config.positions)
    attend = MemoryAttention(memory, setup, budget=None, step=memory.seen)
    heads, kv_heads, dim = llm.config.num_heads, llm.config.num_kv_heads, llm.config.head_dim
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, 1, dim, generator=generator)
    k = torch.randn(1, kv_heads, 1, dim, generator=generator)

    def assert_rotated_at_its_lengths(index: int, layer: LayerMemory) -> None:
        rotated_q, rotated_k = attend._rotate_segments(index, layer, q, k, torch.tensor([memory.seen]))
        at = torch.tensor(layer.lengths).view(1, kv_heads, 1)
        grouped = q.view(1, kv_heads, heads // kv_heads, 1, dim)
        assert torch.equal(rotated_k, setup.rope.rotate(k, at))
        assert torch.equal(rotated_q, setup.rope.rotate(grouped, at[:, :, None]).view(q.shape))

    for index, layer in enumerate(memory.layers):
        assert_rotated_at_its_lengths(index, layer)
    first.truncate([length - 1 for length in first.lengths])
    assert_rotated_at_its_lengths(0, first)


def test_streaming_heads_stay_at_their_window_when_the_longest_head_fits_the_budget(llm):
    """With one retrieval head, one layer has streaming heads only, and its longest head fits a large
    budget for several steps: its heads must still be cut to their window every step."""
    policy_args = {"induction": 0.25, "echo": 0.0, "recent": 6}
    config = PrefillConfig(schedule="fixed", policy="razor", memory=48, chunk=16, policy_args=policy_args)
    memory = llm.prefill(IDS, config).memory
    retrieval = llm.model_facts().head_table("razor", "induction").flatten().argmax()
    for index, layer in enumerate(memory.layers):
        for head, length in enumerate(layer.lengths):
            assert length == (4 + 48 if index * layer.segments + head == retrieval else 4 + 6 + 1)


def test_bytes_follow_the_tokens_held_summed_over_heads(llm):
    shrunk = llm.prefill(IDS, razor(recent=6)).memory
    rectangular = llm.prefill(
        IDS, PrefillConfig(schedule="fixed", policy="snapkv", memory=24, chunk=16)
    ).memory
    for layer in shrunk.layers:  # the prefill's trim leaves no spare room
        assert layer.nbytes == sum(layer.lengths) * layer.entry_bytes()
    assert shrunk.nbytes < rectangular.nbytes
    assert shrunk.held_bytes() == shrunk.nbytes


def test_a_ragged_memory_is_saved_and_restored_whole(llm):
    memory = llm.prefill(IDS, razor(recent=6)).memory
    again = llm.new_memory()
    again.load_tensors(memory.tensors(), seen=memory.seen)
    for mine, theirs in zip(memory.layers, again.layers, strict=True):
        assert mine.lengths == theirs.lengths
        for segment in range(mine.segments):
            for kind in ("keys", "rotated", "values", "positions", "bias"):
                assert torch.equal(mine.segment(segment, kind), theirs.segment(segment, kind))


def test_head_wise_policies_need_the_models_calibration(tmp_path):
    llm = engine.load(write_tiny_checkpoint(tmp_path / "bare"), backend="reference")
    for name in ("razor", "duo", "compresskv"):
        with pytest.raises(CalibrationError, match=r"run `python -m tools\.find_heads -m .*bare`"):
            llm.prefill(IDS, PrefillConfig(schedule="fixed", policy=name, memory=24, chunk=16))
    path = write_calibration(llm)
    data = json.loads(path.read_text())
    data["duo"]["proxy"] = data["duo"]["proxy"][:-1]  # a layer short
    path.write_text(json.dumps(data))
    with pytest.raises(
        PolicyError, match=r"duo\.proxy is not a table of 2 layers x 2 heads .*tools\.find_heads"
    ):
        llm.prefill(IDS, PrefillConfig(schedule="fixed", policy="duo", memory=24, chunk=16))
    path.write_text("{")
    llm = engine.load(path.parent, backend="reference")
    with pytest.raises(
        CalibrationError, match=r"not valid JSON .*remake it with `python -m tools\.find_heads"
    ):
        llm.prefill(IDS, PrefillConfig(schedule="fixed", policy="duo", memory=24, chunk=16))


def test_keeping_per_head_entries_compacts_in_place_and_keeps_the_room():
    """A per-head ``keep`` moves each segment's chosen entries to its front, in order, and leaves the
    segments' room where it was, so the next chunk appends without repacking the buffers."""
    memory = LayerMemory(1, 2, 4, torch.float32, torch.device("cpu"))
    keys = torch.arange(2 * 10 * 4, dtype=torch.float32).view(1, 2, 10, 4)
    memory.append(keys, keys + 0.5, -keys, torch.arange(10))
    memory.keep([torch.tensor([1, 4, 9]), torch.tensor([0, 2, 3, 5, 8])])
    room, offsets, buffer = list(memory.room), list(memory.offsets), memory.flat("keys")
    assert memory.lengths == [3, 5]
    for segment, chosen in enumerate(([1, 4, 9], [0, 2, 3, 5, 8])):
        assert torch.equal(memory.segment(segment, "keys"), keys[0, segment, chosen])
        assert torch.equal(memory.segment(segment, "values"), -keys[0, segment, chosen])
        assert memory.segment(segment, "positions").tolist() == chosen
    new = torch.full((1, 2, 2, 4), 7.0)
    memory.append(new, new, new, torch.tensor([10, 11]))
    assert (memory.room, memory.offsets) == (room, offsets)
    assert memory.flat("keys").data_ptr() == buffer.data_ptr()  # appended in place, not repacked
    assert memory.lengths == [5, 7]
    assert memory.segment(1, "positions").tolist() == [0, 2, 3, 5, 8, 10, 11]
