import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import backends
import policies
from backends import KeyStats
from engine.cache import LayerMemory
from policies import Candidates, ModelFacts, PolicyError, Selection

REFERENCE = backends.get("reference")


def facts(heads: int, group: int = 2, layers: int = 4) -> ModelFacts:
    """A model of ``layers`` x ``heads`` KV heads whose calibration tables are seeded random numbers."""
    generator = torch.Generator().manual_seed(heads * 100 + group)

    def table(width: int) -> list[list[float]]:
        return torch.rand(layers, width, generator=generator).tolist()

    sections = {
        "razor": {"induction": table(heads), "echo": table(heads)},
        "duo": {"proxy": table(heads)},
        "compresskv": {
            "retrieval": table(heads * group),
            "layer_error": torch.rand(layers, generator=generator).tolist(),
        },
    }
    return ModelFacts(layers, heads * group, heads, 8, sections.__getitem__)


def kept_mask(selection, view: Candidates) -> torch.Tensor:
    """Any form of selection as a keep mask [B, Hkv, n]."""
    if isinstance(selection, Selection):
        selection = selection.keep
    if selection.dtype == torch.bool:
        return selection
    return torch.zeros(view.keys.shape[:3], dtype=torch.bool).scatter_(-1, selection, True)


def candidates(batch=1, heads=2, size=12, new=5, group=2, seed=0, layer=0, num_layers=4, step=0):
    """Candidates with real statistics: random queries of a ``new``-token chunk attending to them."""
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(batch, heads, size, 8, generator=generator)
    queries = torch.randn(batch, heads * group, new, 8, generator=generator)
    return Candidates(
        layer=layer,
        num_layers=num_layers,
        step=step,
        keys=keys,
        values=torch.randn(batch, heads, size, 8, generator=generator),
        positions=torch.arange(size).expand(batch, heads, size) + 10,
        new=new,
        stats=None,
        state={},
    ), queries


def prepared(name, options=None, **shape):
    policy = policies.get(name, **(options or {}))
    view, queries = candidates(**shape)
    policy.prepare(facts(view.keys.shape[1], shape.get("group", 2), view.num_layers))
    if policy.needs.queries is not None:
        view.stats = REFERENCE.scores(
            queries, view.keys, last=policy.needs.last, by_query_head=policy.needs.by_query_head
        )
    view.state = {key: torch.zeros(view.positions.shape) for key in policy.state}
    policy.update(view)
    return policy, view


@pytest.mark.parametrize("name", sorted(set(policies.available()) - {"none"}))
@settings(max_examples=25, deadline=None)
@given(
    size=st.integers(1, 40),
    budget=st.integers(0, 40),
    heads=st.integers(1, 3),
    batch=st.integers(1, 2),
    seed=st.integers(0, 1000),
    layer=st.integers(0, 3),
)
def test_selection_is_sorted_unique_and_within_budget(name, size, budget, heads, batch, seed, layer):
    policy, view = prepared(
        name, batch=batch, heads=heads, size=size, new=min(size, 7), seed=seed, layer=layer
    )
    layer_budget = policy.layer_budget(budget, layer, view.num_layers)
    if layer_budget is None or layer_budget >= size:
        return
    selection = policy.select(view, layer_budget)
    if policy.head_wise or policy.merges or policy.low_bits is not None:  # a mask or a Selection: the
        # layer's total is the bound
        keep = kept_mask(selection, view)
        assert keep.shape == view.keys.shape[:3]
        assert (keep.sum(dim=(1, 2)) <= layer_budget * heads).all()
        return
    keep = selection
    assert keep.shape[:2] == (batch, heads) and keep.shape[-1] <= layer_budget
    assert keep.dtype == torch.long
    if keep.numel():
        assert keep.min() >= 0 and keep.max() < size
        assert (keep.diff(dim=-1) > 0).all()


def test_none_keeps_everything_and_local_window_nothing():
    assert policies.get("none").layer_budget(5, 0, 4) is None
    policy, view = prepared("local_window")
    assert policy.layer_budget(5, 0, 4) == 0 and policy.select(view, 0).shape[-1] == 0


def test_streaming_keeps_the_most_recent():
    policy, view = prepared("streaming", size=12)
    assert policy.select(view, 4)[0, 0].tolist() == [8, 9, 10, 11]


def test_knorm_keeps_the_smallest_keys():
    policy, view = prepared("knorm")
    keep = policy.select(view, 3)
    norms = view.keys.norm(dim=-1)
    expected = norms.topk(3, largest=False).indices.sort().values
    assert torch.equal(keep, expected)


def test_random_is_seeded_per_layer_and_step():
    policy, view = prepared("random", {"seed": 3})
    again = policy.select(view, 5)
    assert torch.equal(policy.select(view, 5), again)
    view.step = 1
    assert not torch.equal(policy.select(view, 5), again)


def test_tova_shares_one_choice_across_heads():
    policy, view = prepared("tova", heads=3)
    keep = policy.select(view, 4)
    assert torch.equal(keep[:, 0], keep[:, 1]) and torch.equal(keep[:, 1], keep[:, 2])


def test_h2o_accumulates_mass_over_steps_normalised_by_viewers():
    policy = policies.get("h2o")
    view, _ = candidates(heads=1, size=3)
    view.state = {"h2o_mass": torch.zeros(1, 1, 3), "h2o_seen": torch.zeros(1, 1, 3)}
    view.stats = KeyStats(torch.tensor([[[1.0, 0.5, 0.5]]]), torch.tensor([2, 2, 1]))
    policy.update(view)
    view.stats = KeyStats(torch.tensor([[[0.1, 1.9, 1.0]]]), torch.tensor([3, 3, 3]))
    policy.update(view)
    assert torch.allclose(view.state["h2o_mass"], torch.tensor([[[1.1, 2.4, 1.5]]]))
    assert view.state["h2o_seen"].tolist() == [[[5.0, 5.0, 4.0]]]
    assert torch.allclose(policy.score(view), torch.tensor([[[1.1 / 5, 2.4 / 5, 1.5 / 4]]]))
    assert policy.select(view, 2).tolist() == [[[1, 2]]]


def test_snapkv_pools_then_normalises_and_protects_its_window():
    mass = torch.tensor([[[3.0, 0.0, 0.0, 6.0, 0.0, 3.0]]])
    count = torch.tensor([2, 2, 2, 2, 2, 1])
    view, _ = candidates(heads=1, size=6)
    view.stats = KeyStats(mass, count)
    conv = policies.get("snapkv", window="chunk", kernel=3)
    # avg_pool1d(k=3, zero padding counted): [1, 1, 2, 2, 3, 1]; then / count.
    assert torch.allclose(conv.score(view), torch.tensor([[[0.5, 0.5, 1.0, 1.0, 1.5, 1.0]]]))
    assert conv.select(view, 2).tolist() == [[[3, 4]]]
    snap = policies.get("snapkv", window=2, kernel=3)
    assert snap.needs.queries == 2
    assert snap.select(view, 3).tolist() == [[[3, 4, 5]]]  # the 2 window tokens, then the best other
    assert snap.select(view, 1).tolist() == [[[5]]]  # too small a budget keeps the newest


@pytest.mark.parametrize("options", [{"window": 0}, {"window": "all"}, {"kernel": 4}])
def test_snapkv_refuses_bad_options(options):
    with pytest.raises(PolicyError):
        policies.get("snapkv", **options)


@settings(max_examples=60, deadline=None)
@given(budget=st.integers(0, 5000), layers=st.integers(1, 64), window=st.sampled_from([32, "chunk"]))
def test_pyramidkv_budgets_decrease_with_depth_and_average_to_the_budget(budget, layers, window):
    policy = policies.get("pyramidkv", window=window)
    budgets = [policy.layer_budget(budget, layer, layers) for layer in range(layers)]
    assert sum(budgets) == budget * layers
    assert all(b >= 0 for b in budgets)
    assert all(a >= b for a, b in itertools.pairwise(budgets))


def test_unknown_policy_and_option_are_clear_errors():
    with pytest.raises(ValueError, match=r"unknown policy 'nope'; known: .*snapkv"):
        policies.get("nope")
    with pytest.raises(ValueError, match="policy 'snapkv'"):
        policies.get("snapkv", colour="red")


def test_memory_keep_gathers_every_field_together():
    memory = LayerMemory(1, 2, 4, torch.float32, torch.device("cpu"))
    for start in (0, 5):  # two appends, the second growing the storage
        positions = torch.arange(start, start + 5)
        keys = positions.float()[None, None, :, None].expand(1, 2, 5, 4)
        memory.append(keys, keys + 0.5, -keys, positions)
        memory.state("score")[..., start:] += positions.float() * 10
    assert memory.length == 10
    index = torch.tensor([[[0, 3, 7], [1, 2, 9]]])
    memory.keep(index)
    assert memory.positions.tolist() == [[[0, 3, 7], [1, 2, 9]]]
    assert torch.equal(memory.keys[..., 0], memory.positions.float())
    assert torch.equal(memory.rotated[..., 0], memory.positions.float() + 0.5)
    assert torch.equal(memory.values[..., 0], -memory.positions.float())
    assert torch.equal(memory.state("score"), memory.positions.float() * 10)
    memory.append(
        torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 1, 4), torch.tensor([10])
    )
    assert memory.state("score")[..., -1].tolist() == [[0.0, 0.0]]
