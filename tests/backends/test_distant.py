"""POD's two key sources (``backends.Distant``): distant keys scored against another layer's keys, one
softmax over both, the layer's own values."""

import math

import pytest
import torch

import backends
from backends import Distant


def inputs(lq: int = 5, lk: int = 9, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 4, lq, 8, generator=generator)
    k, v, shared = (torch.randn(1, 2, lk, 8, generator=generator) for _ in range(3))
    return q, k, v, shared


@pytest.mark.parametrize("name", ["reference", "sdpa"])
def test_distant_keys_equal_to_the_own_keys_are_dense_attention(name):
    q, k, v, _ = inputs()
    backend = backends.get(name)
    distant = Distant(k.clone(), torch.arange(4, 9), torch.arange(9), initial=1, recent=2)
    dense = backend.prefill(q, k, v)
    shared = backend.prefill(q, k, v, distant=distant)
    torch.testing.assert_close(shared.out, dense.out, rtol=0, atol=1e-6)
    step = backend.decode(q[:, :, -1:], k, v, distant=Distant(k, torch.tensor([8]), torch.arange(9), 1, 2))
    torch.testing.assert_close(step.out, dense.out[:, :, -1:], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["reference", "sdpa"])
def test_each_score_takes_its_key_by_distance_in_one_softmax(name):
    """Against a loop over every (query, key): own key when proximal, the shared one when distant."""
    q, k, v, shared = inputs()
    initial, recent = 2, 3
    query_positions, key_positions = torch.arange(4, 9), torch.arange(9)
    result = backends.get(name).prefill(
        q, k, v, distant=Distant(shared, query_positions, key_positions, initial, recent)
    )
    expected = torch.zeros_like(q)
    for head in range(4):
        kv = head // 2
        for row, at in enumerate(query_positions.tolist()):
            logits, rows = [], []
            for j in range(at + 1):
                far = j >= initial and at - j >= recent
                key = (shared if far else k)[0, kv, j]
                logits.append(float(q[0, head, row] @ key) / math.sqrt(8))
                rows.append(v[0, kv, j])
            weights = torch.tensor(logits).softmax(dim=0)
            expected[0, head, row] = sum(w * value for w, value in zip(weights, rows, strict=True))
    torch.testing.assert_close(result.out, expected, rtol=1e-5, atol=1e-5)
    step = backends.get(name).decode(
        q[:, :, -1:], k, v, distant=Distant(shared, query_positions[-1:], key_positions, initial, recent)
    )
    torch.testing.assert_close(step.out, expected[:, :, -1:], rtol=1e-5, atol=1e-5)


def test_the_triton_kernels_say_they_do_not_read_two_key_sources():
    spec = backends.AttentionSpec(head_dim=64, group=2, dtype=torch.float32, device="cpu", distant=True)
    reason = backends.get("triton").lacks(spec)
    assert reason is not None and "one key source" in reason
    assert backends.resolve("auto", spec).name in ("sdpa", "reference")


@pytest.mark.parametrize("window", [None, 4])
def test_the_fused_two_pass_path_equals_the_reference(window):
    """sdpa's two fused passes merged by LSE, over tiles of rows, against the reference's scores."""
    q, k, v, shared = inputs(lq=700, lk=760, seed=4)
    distant = Distant(shared, torch.arange(60, 760), torch.arange(760), initial=3, recent=50)
    expected = backends.get("reference").prefill(q, k, v, window=window, distant=distant)
    fused = backends.get("sdpa").prefill(q, k, v, window=window, distant=distant)
    torch.testing.assert_close(fused.out, expected.out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.lse, expected.lse, rtol=1e-5, atol=1e-5)
