"""POD (``engine.pod``): the greedy layer grouping, the memory arithmetic, and the engine reading a
follower layer's distant keys from its block leader."""

import json
from dataclasses import replace

import pytest
import torch
from tiny import write_calibration, write_tiny_checkpoint

import engine
from engine import GREEDY, PrefillConfig
from engine.calibration import CalibrationError
from engine.config import RopeConfig
from engine.pod import PodPlan, PodSettings, adapted, fit_adapter, group_layers, js_similarity
from models.rope import Rope
from tools.prefill_specs import parse_specs

IDS = torch.randint(3, 320, (60,), generator=torch.Generator().manual_seed(2)).tolist()


def test_js_similarity_by_hand():
    p, q = torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5])
    # M = (0.75, 0.25): KL(p|M) = log2(4/3), KL(q|M) = (log2(2/3) + log2(2)) / 2
    divergence = (torch.tensor(4 / 3).log2() + (torch.tensor(2 / 3).log2() + 1) / 2) / 2
    torch.testing.assert_close(js_similarity(p, q), 1 - divergence)
    assert js_similarity(p, p) == 1 and js_similarity(p, torch.tensor([0.0, 1.0])) == 0


def test_the_greedy_grouping_compares_with_the_blocks_lowest_layer():
    # Attention maps over 3 distant columns, per layer, for one KV head: layers 1 and 2 look like
    # layer 0; layer 3 does not, though it looks like layer 2 (its block's lowest layer is 0).
    maps = torch.tensor([[0.8, 0.1, 0.1], [0.7, 0.2, 0.1], [0.5, 0.4, 0.1], [0.1, 0.1, 0.8], [0.1, 0.2, 0.7]])
    similarity = js_similarity(maps[:, None], maps[None, :])[None]  # [1, L, L]
    assert group_layers(similarity, 0.8) == ((0,), (0,), (0,), (3,), (3,))
    assert group_layers(similarity, 0.0) == ((0,),) * 5  # one block
    assert group_layers(similarity, 1.0) == tuple((layer,) for layer in range(5))  # no sharing
    # per KV head: a second head whose layers all differ
    two = torch.stack((similarity[0], torch.eye(5)))
    assert group_layers(two, 0.8) == ((0, 0), (0, 1), (0, 2), (3, 3), (3, 4))


def test_the_bytes_saved_follow_the_notes_arithmetic():
    plan = PodPlan(((0, 0), (0, 1), (0, 2), (3, 3)), initial=16, recent=1008)
    assert plan.followers(1) == [0] and plan.followers(0) == [] and plan.shared_fraction == 2 / 8
    # 0.5 * f_D * (1 - blocks / layers), blocks per head (2 and 4) over 4 layers: 1 - 6/8
    assert plan.saving(4096) == pytest.approx(0.5 * (4096 - 1024) / 4096 * (1 - 6 / 8))
    assert plan.saving(512) == 0


@pytest.fixture(scope="module", params=["reference", "sdpa"])
def llm(request, tmp_path_factory):
    directory = write_tiny_checkpoint(tmp_path_factory.mktemp("pod") / "ckpt")
    llm = engine.load(directory, backend=request.param)
    write_calibration(llm)
    return llm


def test_without_sharing_the_logits_equal_full_attention(llm):
    dense = llm.logits(IDS)[-1]
    result = llm.prefill(IDS, PrefillConfig(pod={"threshold": 1.0, "initial": 2, "recent": 4}))
    torch.testing.assert_close(result.logits[0].float(), dense, rtol=1e-4, atol=1e-4)
    # with sharing but no token distant yet, too
    result = llm.prefill(IDS, PrefillConfig(pod={"threshold": 0.0, "recent": len(IDS)}))
    torch.testing.assert_close(result.logits[0].float(), dense, rtol=1e-4, atol=1e-4)


def test_a_follower_reads_its_leaders_keys_for_distant_tokens(llm, monkeypatch):
    config = PrefillConfig(pod={"threshold": 0.0, "initial": 2, "recent": 8})  # layer 1 follows layer 0
    seen = []
    backend = type(llm.attention_setup(config.build_policy(), pod=config.pod_settings()).backend)
    original = backend.prefill

    def spy(self, q, k, v, **options):
        seen.append((k, options.get("distant")))
        return original(self, q, k, v, **options)

    monkeypatch.setattr(backend, "prefill", spy)
    result = llm.prefill(IDS, config)
    (_, first), (own, distant) = seen
    assert first is None  # layer 0 leads: it reads its own keys
    leader = result.memory.layers[0].rotated
    assert torch.equal(distant.keys, leader) and not torch.equal(own, leader)
    assert (distant.initial, distant.recent) == (2, 8) and distant.mask().sum() > 0
    assert not torch.allclose(result.logits[0].float(), llm.logits(IDS)[-1], atol=1e-3)


def test_generation_shares_keys_too_and_equals_dense_without_sharing(llm):
    dense = llm.generate(IDS, sampling=GREEDY, max_tokens=6, ignore_eos=True)
    same = llm.generate(IDS, prefill=PrefillConfig(pod={"threshold": 1.0}), sampling=GREEDY, max_tokens=6,
                        ignore_eos=True)  # fmt: skip
    assert same.token_ids == dense.token_ids
    shared = llm.generate(IDS, prefill=PrefillConfig(pod={"threshold": 0.0, "initial": 2, "recent": 4}),
                          sampling=GREEDY, max_tokens=6, ignore_eos=True)  # fmt: skip
    assert len(shared.token_ids) == 6


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (dict(pod={"threshold": 2}), "pod threshold must be a number from 0 to 1"),
        (dict(pod={"recent": 0}), "pod recent must be a positive number of tokens"),
        (dict(pod={"window": 3}), "unknown pod option window"),
        (dict(pod={"adapt": 2}), "pod adapt must be 0 or 1"),
        (dict(pod={}, policy="snapkv"), "bounded memory with it .* is not built yet"),
        (dict(pod={}, kv_bits=8), "bounded memory with it .* is not built yet"),
    ],
)
def test_bad_settings_are_refused_in_one_line(config, message):
    with pytest.raises(ValueError, match=message):
        PrefillConfig(**config)


def test_a_calibration_without_pods_section_names_the_command(llm):
    path = write_calibration(llm)
    data = json.loads(path.read_text())
    del data["pod"]
    path.write_text(json.dumps(data))
    llm._calibration = None
    try:
        with pytest.raises(CalibrationError, match=r"no 'pod' calibration: run `python -m tools.find_heads"):
            llm.prefill(IDS, PrefillConfig(pod={}))
    finally:
        write_calibration(llm)
        llm._calibration = None


def test_settings_defaults_are_the_papers_initial_and_an_eighth_of_the_window():
    assert PodSettings() == PodSettings(threshold=0.5, initial=16, recent=1024, adapt=False)


def test_the_tools_specs_name_pod_on_full_attention():
    (named,) = parse_specs("full:pod=0.7:pod_recent=512")
    assert named.label == "full:pod=0.7:pod_recent=512"
    assert named.config.pod_settings() == PodSettings(threshold=0.7, recent=512)


def test_the_key_adapter_recovers_a_scale_per_rotary_pair_and_commutes_with_rope():
    generator = torch.Generator().manual_seed(3)
    leader = torch.randn(2, 40, 8, generator=generator)
    scale = torch.complex(torch.randn(2, 4, generator=generator), torch.randn(2, 4, generator=generator))
    own = adapted(leader, scale)
    torch.testing.assert_close(fit_adapter(own, leader), scale)
    # by hand, one pair: (x1, x2) = (1, 2) times 2i is (-4, 2)
    pair = torch.tensor([[1.0, 0.0, 2.0, 0.0]])
    torch.testing.assert_close(adapted(pair, torch.tensor([2j, 1])), torch.tensor([[-4.0, 0.0, 2.0, 0.0]]))
    rope = Rope(8, RopeConfig(theta=10000.0))
    positions = torch.arange(40)
    torch.testing.assert_close(rope.rotate(own, positions), adapted(rope.rotate(leader, positions), scale))


def test_the_adapter_changes_only_followers_and_runs_end_to_end(llm):
    dense = llm.logits(IDS)[-1]
    none_shared = llm.prefill(IDS, PrefillConfig(pod={"threshold": 1.0, "adapt": 1}))
    torch.testing.assert_close(none_shared.logits[0].float(), dense, rtol=1e-4, atol=1e-4)
    shared = PrefillConfig(pod={"threshold": 0.0, "initial": 2, "recent": 8})
    plain = llm.prefill(IDS, shared).logits[0].float()
    fitted = llm.prefill(IDS, replace(shared, pod={**shared.pod, "adapt": 1})).logits[0].float()
    assert not torch.equal(plain, fitted) and torch.isfinite(fitted).all()
