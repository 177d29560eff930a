"""MiKV: demote instead of evict. The selection on hand-made scores, the two-tier memory it drives, and
the engine end to end on a tiny model."""

import pytest
import torch
from tiny import write_tiny_checkpoint

import engine
import policies
from backends import Packed
from engine import GREEDY, PrefillConfig
from engine.cache import KINDS, LayerMemory
from engine.chat import main
from engine.kv_quant import KVCodec
from policies import Candidates, PolicyError
from tools.prefill_specs import parse_specs

DIM = 16


def scored(scores: list[list[float]], low: list[list[bool]] | None = None) -> Candidates:
    """Candidates whose scores (the ``key_norm`` scorer's: minus the key's norm) are ``scores``."""
    values = torch.tensor(scores)
    keys = torch.zeros(1, *values.shape, DIM)
    keys[..., 0] = -values  # norm = -score for negative scores
    return Candidates(
        layer=0, num_layers=1, step=0, keys=keys, values=torch.zeros_like(keys),
        positions=torch.arange(values.shape[-1]).expand(1, *values.shape), new=1, stats=None, state={},
        low=None if low is None else torch.tensor([low]),
    )  # fmt: skip


def test_the_best_share_stays_high_the_rest_of_the_budget_is_demoted_the_others_evicted():
    policy = policies.get("mikv", scorer="knorm", high=0.5)
    view = scored([[-1.0, -7.0, -3.0, -8.0, -2.0, -5.0, -4.0, -6.0]])  # best: 0, 4, 2, 6, 5, ...
    selection = policy.select(view, 4)
    assert selection.keep[0, 0].nonzero()[:, 0].tolist() == [0, 2, 4, 6]
    assert selection.low[0, 0].nonzero()[:, 0].tolist() == [2, 6]  # 2 of 4 at full precision: 0 and 4


def test_a_demoted_token_never_moves_back_up():
    policy = policies.get("mikv", scorer="knorm", high=0.5)
    already_low = [[True, False, False, False, True, False, False, False]]
    view = scored([[-1.0, -7.0, -3.0, -8.0, -2.0, -5.0, -4.0, -6.0]], already_low)
    selection = policy.select(view, 4)
    assert selection.keep[0, 0].nonzero()[:, 0].tolist() == [0, 2, 4, 6]  # ranks decide what is kept
    # The full-precision share goes to the best tokens still at full precision: 2 and 6.
    assert selection.low[0, 0].nonzero()[:, 0].tolist() == [0, 4]


def test_with_everything_at_full_precision_mikv_selects_what_its_scorer_selects():
    view = scored([[-1.0, -7.0, -3.0, -8.0, -2.0, -5.0], [-9.0, -1.0, -2.0, -3.0, -8.0, -4.0]])
    selection = policies.get("mikv", scorer="knorm", high=1.0).select(view, 3)
    plain = policies.get("knorm").select(view, 3)
    assert torch.equal(selection.keep.nonzero()[:, -1].view(1, 2, 3), plain)
    assert not selection.low.any()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"bits": 5}, "mikv bits must be one of 2, 3, 4, 8, got 5"),
        ({"high": 1.5}, "mikv high must be within 0..1"),
    ],
)
def test_bad_options_are_refused(options, message):
    with pytest.raises(PolicyError, match=message):
        policies.get("mikv", **options)


def test_a_two_tier_memory_keeps_order_positions_and_exact_bytes():
    generator = torch.Generator().manual_seed(4)
    keys, values = torch.randn(2, 1, 3, 10, DIM, generator=generator)
    queries = torch.randn(1, 6, 10, DIM, generator=generator)
    codec = KVCodec(4, DIM)
    layer = LayerMemory(1, 3, DIM, torch.float32, torch.device("cpu"), low=codec)
    layer.append(keys, keys, values, torch.arange(10), queries)
    assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values)  # arrivals: full precision

    start = layer.offsets  # where each KV head's entries begin in the flat buffers
    layer.demote(torch.tensor([start[0] + 1, start[0] + 2, start[0] + 7, start[1] + 2, start[2] + 5]))
    layer.demote(torch.tensor([start[0] + 2, start[0] + 3]))  # 2 is already low: it stays as it is
    low = layer.window("low", 0, layer.lengths)[0]  # [1, 3, 10]
    assert [row.nonzero()[:, 0].tolist() for row in low[0]] == [[1, 2, 3, 7], [2], [5]]
    assert torch.equal(layer.positions, torch.arange(10).expand(1, 3, 10))  # order untouched
    for kind, original in (("keys", keys), ("values", values)):
        read = getattr(layer, kind)
        assert torch.equal(read[~low], original[~low])  # full precision: exact
        assert (read[low] - original[low]).abs().max() < 1.0  # 4 bits: within a few steps
    assert (layer.values[low] - values[low]).abs().max() > 0  # really quantized

    layer.keep(torch.tensor([[[0, 2, 3, 9]] * 3]))  # evicts entries of both tiers
    low = layer.window("low", 0, layer.lengths)[0]
    assert low[0].tolist() == [[False, True, True, False], [False, True, False, False], [False] * 4]
    layer.append(keys[:, :, :2], keys[:, :, :2], values[:, :, :2], torch.arange(10, 12))
    layer.trim()
    lows = 3  # entries 2 and 3 of the first head, 2 of the second
    held = sum(layer.lengths)
    assert layer.lengths == [6, 6, 6]
    expected = held * (8 + 4) + len(KINDS) * ((held - lows) * DIM * 4 + lows * codec.vector_bytes)
    assert layer.held_bytes() == layer.nbytes == expected

    saved = layer.snapshot()
    again = LayerMemory(1, 3, DIM, torch.float32, torch.device("cpu"), low=codec)
    again.restore(saved)
    assert torch.equal(again.keys, layer.keys) and torch.equal(again.flat("low"), layer.flat("low"))


def test_decode_appends_to_a_two_tier_memory_keep_every_vector_and_grow_its_store_by_quarters():
    """A decode step appends one token per head; the full-precision store keeps room for more (as the
    entry buffers do) rather than being copied on every append, and ``trim`` gives the room back."""
    generator = torch.Generator().manual_seed(6)
    keys, values = torch.randn(2, 1, 2, 40, DIM, generator=generator)
    layer = LayerMemory(1, 2, DIM, torch.float32, torch.device("cpu"), low=KVCodec(2, DIM))
    layer.append(keys[:, :, :8], keys[:, :, :8], values[:, :, :8], torch.arange(8))
    layer.demote(torch.tensor([layer.offsets[0] + 3, layer.offsets[1] + 5]))
    stores = set()
    for token in range(8, 40):
        one = slice(token, token + 1)
        layer.append(keys[:, :, one], keys[:, :, one], values[:, :, one], torch.tensor([token]))
        stores.add(layer._vectors["keys"].shape[0])
    assert len(stores) < 10  # grown a few times, not once per append
    low = layer.window("low", 0, layer.lengths)[0]
    assert int(low.sum()) == 2
    assert torch.equal(layer.values[~low], values[~low]) and torch.equal(layer.keys[~low], keys[~low])
    layer.trim()
    assert layer.nbytes == layer.held_bytes()


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return engine.load(write_tiny_checkpoint(tmp_path_factory.mktemp("mikv") / "ckpt", "llama"))


IDS = torch.randint(3, 320, (90,), generator=torch.Generator().manual_seed(5)).tolist()


def test_with_every_token_at_full_precision_mikv_is_its_scorer(llm):
    plain = llm.prefill(IDS, PrefillConfig(policy="h2o", memory=24, chunk=16))
    mikv = llm.prefill(IDS, PrefillConfig(policy="mikv", memory=24, chunk=16, policy_args={"high": 1.0}))
    for before, after in zip(plain.memory.layers, mikv.memory.layers, strict=True):
        assert torch.equal(before.positions, after.positions) and torch.equal(before.keys, after.keys)
    assert torch.equal(plain.logits, mikv.logits)


@pytest.mark.parametrize("bits", [4, 2])
def test_the_engine_holds_the_budget_in_two_tiers(llm, bits):
    config = PrefillConfig(policy="mikv", memory=24, chunk=16, policy_args={"bits": bits})
    result = llm.prefill(IDS, config)
    for layer in result.memory.layers:
        low = layer.flat("low")[layer._entries()].view(layer.segments, -1)
        assert layer.lengths == [4 + 24] * layer.segments  # sinks + the budget: nothing evicted early
        assert (low[:, :4] == 0).all()  # sinks stay at full precision
        assert (low.sum(dim=1) == 24 - 6).all()  # a quarter of the budget (6) at full precision
        assert (layer.positions.diff(dim=-1) > 0).all()  # original order
    codec, dim = KVCodec(bits, llm.config.head_dim), llm.config.head_dim
    heads = llm.config.num_layers * llm.config.num_kv_heads
    per_entry = 8 + 4 + 2 * 4  # position, tier slot, and h2o's two states
    vectors = len(KINDS) * (10 * dim * 4 + 18 * codec.vector_bytes)  # sinks + 6 high, 18 low
    assert result.memory.held_bytes() == heads * (28 * per_entry + vectors)
    text = llm.complete(result, IDS, max_tokens=4).token_ids
    assert len(text) == 4


def test_a_budget_in_bytes_holds_more_tokens_with_mikv(llm):
    memory_bytes = 40 * llm.new_memory().bytes_per_token(2)  # h2o keeps two states per token
    plain = llm.sized(PrefillConfig(policy="h2o", chunk=16, memory_bytes=memory_bytes))
    mikv = llm.sized(PrefillConfig(policy="mikv", chunk=16, memory_bytes=memory_bytes))
    assert mikv.memory > 2 * plain.memory
    result = llm.prefill(IDS * 3, PrefillConfig(policy="mikv", chunk=64, memory_bytes=memory_bytes))
    assert result.memory.held_bytes() <= memory_bytes


def test_mikv_is_one_flag_away_and_refuses_a_whole_quantized_memory(llm, capsys):
    path = str(llm.path)
    flags = ["--policy", "mikv", "--memory", "16", "--chunk", "16", "--policy-arg", "scorer=snapkv"]
    assert main(["-m", path, "-p", "hi " * 40, "-n", "1", *flags, "--policy-arg", "bits=2"]) == 0
    assert main(["-m", path, "-p", "hi", "-n", "1", "--policy", "mikv", "--kv-bits", "4"]) == 2
    err = capsys.readouterr().err
    assert "kv_bits 4 stores the whole memory quantized, while policy 'mikv' keeps" in err
    assert "Traceback" not in err
    (spec,) = parse_specs("imdc:mikv:64:bits=2")
    assert spec.config.build_policy().low_bits == 2


def test_decode_reads_the_packed_tiers_where_the_backend_can(llm, monkeypatch):
    pytest.importorskip("backends.triton")
    fast = engine.load(llm.path, backend="triton")
    config = PrefillConfig(policy="mikv", memory=24, chunk=16, policy_args={"bits": 3})
    seen = []
    triton = type(fast.attention_setup(config.build_policy()).backend)
    original = triton.decode
    monkeypatch.setattr(
        triton, "decode", lambda self, q, k, *a, **o: seen.append(type(k)) or original(self, q, k, *a, **o)
    )
    plain = llm.complete(llm.prefill(IDS, config), IDS, max_tokens=4, sampling=GREEDY)
    packed = fast.complete(fast.prefill(IDS, config), IDS, max_tokens=4, sampling=GREEDY)
    assert seen and all(kind is Packed for kind in seen)
    assert packed.token_ids == plain.token_ids
