"""Head-wise budgets and head roles: allocators, RazorAttention, DuoAttention, CompressKV, EMS."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_policies import candidates, facts, kept_mask, prepared

import backends
import policies
from backends import KeyStats
from engine.cache import LayerMemory
from policies import Candidates, Policy, PolicyError, Selection, apportion

REFERENCE = backends.get("reference")


class Fixed(Policy):
    """Scores given by the test."""

    def __init__(self, scores: torch.Tensor | None = None) -> None:
        self.scores = scores  # None: all equal

    def score(self, candidates: Candidates) -> torch.Tensor:
        return torch.zeros(candidates.positions.shape) if self.scores is None else self.scores


def view_of(scores: torch.Tensor, valid: torch.Tensor | None = None) -> Candidates:
    view, _ = candidates(batch=scores.shape[0], heads=scores.shape[1], size=scores.shape[2])
    view.valid = valid
    return view


def test_adakv_hand_computed():
    scores = torch.tensor([[[9.0, 8.0, 7.0, 1.0], [0.5, 0.4, 0.3, 0.2]]])
    policy = policies.get("adakv", scorer=Fixed(scores), alpha=0.5)
    keep = policy.select(view_of(scores), 2)  # floor 1 each, then the best 2 of the rest: 8 and 7
    assert keep.tolist() == [[[True, True, True, False], [True, False, False, False]]]


@pytest.mark.parametrize("name", ["adakv", "uncomp"])
@settings(max_examples=30, deadline=None)
@given(
    heads=st.integers(1, 4),
    size=st.integers(2, 30),
    budget=st.integers(1, 30),
    alpha=st.sampled_from([0.0, 0.2, 0.5, 1.0]),
    seed=st.integers(0, 1000),
    ragged=st.booleans(),
)
def test_allocators_spend_the_layer_budget_with_floors_on_each_heads_best(
    name, heads, size, budget, alpha, seed, ragged
):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(2, heads, size, generator=generator)
    valid = None
    if ragged:  # heads of different lengths: left padding
        lengths = torch.randint(1, size + 1, (2, heads), generator=generator)
        valid = torch.arange(size) >= (size - lengths)[..., None]
        scores = scores.masked_fill(~valid, float("-inf"))
    view = view_of(scores, valid)
    view.keys = torch.randn(view.keys.shape, generator=generator)
    policy = policies.get(name, scorer=Fixed(scores), alpha=alpha)
    keep = policy.select(view, budget)
    real = torch.full((2, heads), size) if valid is None else valid.sum(dim=-1)
    assert (keep.sum(dim=(1, 2)) == torch.minimum(real.sum(dim=1), torch.tensor(budget * heads))).all()
    floor = torch.minimum(real, torch.tensor(int(alpha * budget)))
    assert (keep.sum(dim=-1) >= floor).all()
    if valid is not None:
        assert not (keep & ~valid).any()
    for row, kept in zip(scores.flatten(0, 1), keep.flatten(0, 1), strict=True):
        if kept.any() and (~kept & (row > float("-inf"))).any():
            assert row[kept].min() >= row[~kept & (row > float("-inf"))].max()


def test_uncomp_gives_spread_keys_more_than_collinear_ones():
    generator = torch.Generator().manual_seed(0)
    view, _ = candidates(heads=2, size=64)
    direction = torch.randn(8, generator=generator)
    view.keys[0, 0] = direction + 0.01 * torch.randn(64, 8, generator=generator)
    view.keys[0, 1] = torch.randn(64, 8, generator=generator)
    scores = torch.randn(1, 2, 64, generator=generator)
    keep = policies.get("uncomp", scorer=Fixed(scores)).select(view, 16)
    assert keep[0, 1].sum() > keep[0, 0].sum() >= int(0.2 * 16)
    assert keep.sum() == 32


@settings(max_examples=60, deadline=None)
@given(
    weights=st.lists(st.floats(0, 10), min_size=1, max_size=12),
    total=st.integers(0, 500),
    floor=st.integers(0, 20),
    cap=st.integers(0, 100),
)
def test_apportion_sums_to_the_total_within_floors_and_capacities(weights, total, floor, cap):
    shares = apportion(total, weights, floor, [cap] * len(weights))
    assert all(min(floor, cap) <= share <= cap for share in shares)
    assert sum(shares) == min(max(total, min(floor, cap) * len(weights)), cap * len(weights))


def test_a_wrapped_name_routes_each_option_to_the_policy_that_takes_it():
    policy = policies.get("adakv(snapkv)", alpha=0.1, window=8)
    assert policy.alpha == 0.1 and policy.scorer.window == 8 and policy.needs.queries == 8
    assert policies.get("adakv(h2o)").state == ("h2o_mass", "h2o_seen")
    assert type(policies.get("pyramidkv").scorer).__name__ == "SnapKV"
    with pytest.raises(PolicyError, match="does not wrap"):
        policies.get("snapkv(h2o)")
    with pytest.raises(ValueError, match="policy 'h2o' has no option colour"):
        policies.get("adakv(h2o)", colour="red")
    assert {"adakv", "pyramid", "razor", "duo", "uncomp"} <= set(policies.wrappers())


def razor_everywhere_streaming(**options) -> Policy:
    policy = policies.get("razor", scorer=Fixed(), induction=0.0, echo=0.0, **options)
    policy.prepare(facts(2))
    return policy


def test_razor_streaming_heads_keep_recent_and_fold_the_rest_into_the_oldest():
    policy = razor_everywhere_streaming(recent=3)
    view = view_of(torch.zeros(1, 2, 8))
    selection = policy.select(view, 6)
    assert selection.keep[0, 0].tolist() == [True, False, False, False, False, True, True, True]
    assert selection.into[0, 0].tolist() == [-1, 0, 0, 0, 0, -1, -1, -1]


def test_razor_with_one_dropped_token_keeps_it_as_it_is():
    policy = razor_everywhere_streaming(recent=3)
    view = view_of(torch.zeros(1, 2, 4))
    selection = policy.select(view, 4)
    assert selection.keep.all() and (selection.into == -1).all()


def test_razor_retrieval_heads_keep_their_scorers_best():
    policy = policies.get("razor", scorer=Fixed(torch.tensor([[[5.0, 1, 4, 2, 3]]])), induction=1.0)
    policy.prepare(facts(1))
    selection = policy.select(view_of(torch.zeros(1, 1, 5)), 2)
    assert selection.keep.tolist() == [[[True, False, True, False, False]]]


def test_a_compensation_entry_attends_as_its_tokens_mean_counted_that_many_times():
    torch.manual_seed(0)
    memory = LayerMemory(1, 1, 4, torch.float32, torch.device("cpu"))
    keys, values = torch.randn(1, 1, 6, 4), torch.randn(1, 1, 6, 4)
    memory.append(keys, keys, values, torch.arange(6))
    memory.merge(torch.tensor([1, 1]), torch.tensor([2, 3]))  # tokens 1, 2, 3 into one entry
    memory.keep([torch.tensor([0, 1, 4, 5])])
    mean_key, mean_value = keys[0, 0, 1:4].mean(dim=0), values[0, 0, 1:4].mean(dim=0)
    assert torch.allclose(memory.keys[0, 0, 1], mean_key)
    assert torch.allclose(memory.values[0, 0, 1], mean_value)
    assert memory.bias[0, 0].tolist() == pytest.approx([0, math.log(3), 0, 0])
    q = torch.randn(1, 1, 1, 4)
    # By hand: softmax over the kept tokens, the mean counted 3 times.
    logits = torch.stack([keys[0, 0, i] @ q[0, 0, 0] / 2 for i in (0, 4, 5)] + [mean_key @ q[0, 0, 0] / 2])
    weights = torch.tensor([1.0, 1.0, 1.0, 3.0]) * logits.exp()
    expected = (weights[:, None] * torch.stack([values[0, 0, i] for i in (0, 4, 5)] + [mean_value])).sum(0)
    expected = expected / weights.sum()
    memory.set_rotated(lambda k, p: k)
    out = REFERENCE.decode(q, memory.rotated, memory.values, bias=memory.bias).out
    assert torch.allclose(out[0, 0, 0], expected, atol=1e-6)
    # Folding more in later keeps the count-weighted mean of every token folded.
    memory.append(keys[:, :, :2] * 2, keys[:, :, :2] * 2, values[:, :, :2] * 2, torch.arange(6, 8))
    memory.merge(torch.tensor([1]), torch.tensor([4]))
    total_key = (keys[0, 0, 1:4].sum(0) + 2 * keys[0, 0, 0]) / 4
    assert torch.allclose(memory.segment(0, "keys")[1], total_key, atol=1e-6)
    assert memory.segment(0, "bias")[1].item() == pytest.approx(math.log(4))


def test_duo_streams_the_lowest_fraction_with_sinks_and_recent():
    policy = policies.get("duo", scorer=Fixed(torch.arange(20.0).expand(1, 2, 20)), sink=12, recent=3)
    model = facts(2, layers=1)
    policy.prepare(model)
    proxy = model.head_table("duo", "proxy")
    streaming = int(proxy[0].argmin())
    view = view_of(torch.zeros(1, 2, 20))
    view.positions = torch.arange(20).expand(1, 2, 20) + 10  # positions 10..29: 10 and 11 below sink
    keep = kept_mask(policy.select(view, 8), view)
    assert keep[0, streaming].nonzero()[:, 0].tolist() == [0, 1, 17, 18, 19]
    assert keep[0, 1 - streaming].nonzero()[:, 0].tolist() == list(range(12, 20))


def test_compresskv_shares_one_choice_and_spreads_layer_budgets_by_error():
    policy, view = prepared("compresskv", heads=3, size=40, new=8)
    keep = policy.select(view, 10)
    assert torch.equal(keep[:, 0], keep[:, 1]) and torch.equal(keep[:, 1], keep[:, 2])
    budgets = [policy.layer_budget(100, layer, 4) for layer in range(4)]
    assert sum(budgets) == 400 and all(32 <= b <= 300 for b in budgets)
    errors = policy.layer_error
    assert budgets.index(max(budgets)) == errors.index(max(errors))


def test_ems_folds_dropped_tokens_into_their_most_similar_kept_key():
    view = view_of(torch.zeros(1, 1, 4))
    view.keys = torch.tensor([[[[1.0, 0], [0, 1.0], [0.9, 0.1], [-1.0, 0]]]])
    view.stats = KeyStats(torch.tensor([[[4.0, 3.0, 1.0, 0.5]]]), torch.tensor([1, 1, 1, 1]))
    view.state = {"h2o_mass": torch.zeros(1, 1, 4), "h2o_seen": torch.zeros(1, 1, 4)}
    policy = policies.get("ems")
    policy.update(view)
    selection = policy.select(view, 2)
    assert isinstance(selection, Selection)
    assert selection.keep.tolist() == [[[True, True, False, False]]]
    # Token 2 is like token 0 (cosine 0.99); token 3 is like nothing kept: dropped.
    assert selection.into.tolist() == [[[-1, -1, 0, -1]]]


def test_calibrated_policies_refuse_a_table_of_the_wrong_shape():
    model = facts(2, layers=3)
    wrong = type(model)(4, 4, 2, 8, model.calibration, "python -m tools.find_heads -m X")
    for name in ("razor", "duo", "compresskv"):
        with pytest.raises(PolicyError, match=r"run `python -m tools.find_heads -m X`"):
            policies.get(name).prepare(wrong)
