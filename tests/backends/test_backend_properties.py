"""Every registered backend against the float32 reference, on cases drawn by Hypothesis.

A backend that does not support a case (``supports`` says no) passes it: unsupported is a result.
KV heads of different lengths (``Segments``) and biased entries are drawn by their own test, with
fewer examples, and run on the fixed cases of ``tools.check_backends`` that pin their edges.
"""

from __future__ import annotations

import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

import backends
from backends import Segments
from backends.reference import visible
from tools.check_backends import (
    ABSOLUTE_FLOOR,
    CASES,
    DTYPES,
    OPS,
    Case,
    plain_attention,
    plain_mass,
    run_case,
    upcast,
)

TESTED = [name for name in backends.available() if name not in ("auto", "reference")]


@st.composite
def cases(draw: st.DrawFn, min_group: int = 1, ragged_or_biased: bool = False) -> Case:
    """Small, odd-sized problems: memory 0 included, GQA groups up to 4 (3 as in the default model).
    ``ragged_or_biased``: KV heads of different lengths (each its own memory, 0 included), biased
    entries, or both."""
    batch, kv_heads = draw(st.integers(1, 2)), draw(st.integers(1, 3 if ragged_or_biased else 2))
    q_len = draw(st.integers(1, 40 if ragged_or_biased else 100))
    ragged, bias = draw(st.sampled_from([(True, False), (True, True), (False, True)]))
    if not ragged_or_biased:
        ragged, bias = False, False
    segments = batch * kv_heads
    memories = (
        tuple(draw(st.lists(st.integers(0, 150), min_size=segments, max_size=segments))) if ragged else None
    )
    memory = 0 if ragged else draw(st.integers(0, 150))
    longest = max(memories) if ragged else memory
    return Case(
        batch=batch,
        kv_heads=kv_heads,
        group=draw(st.sampled_from([group for group in (1, 2, 3, 4) if group >= min_group])),
        head_dim=draw(st.sampled_from([16, 32, 64, 128])),
        q_len=q_len,
        memory=memory,
        window=draw(st.none() | st.integers(1, q_len + longest)),
        dtype=draw(st.sampled_from(list(DTYPES.values()))),
        strided=draw(st.booleans()),
        last=draw(st.integers(1, q_len)),
        seed=draw(st.integers(0, 2**16)),
        memories=memories,
        bias=bias,
    )


def run_examples(examples: int, check, strategy: st.SearchStrategy | None = None) -> None:
    """Run ``check(case)`` on ``examples`` cases, the same ones every run (derandomized)."""
    given(case=cases() if strategy is None else strategy)(
        settings(max_examples=examples, deadline=None, derandomize=True)(check)
    )()


def max_abs(tensor: torch.Tensor) -> float:
    return tensor.float().abs().max().item()


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", TESTED, indirect=True)
def test_matches_reference(backend, examples, device, op):
    def check(case: Case) -> None:
        checks = run_case(op, backend, case, device)
        failed = [check for check in checks or [] if not check.passed]
        assert not failed, f"{op} on {case.name}: {failed}"

    run_examples(examples, check)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", TESTED, indirect=True)
def test_ragged_and_biased_match_reference(backend, examples, device, op):
    """KV heads of different lengths read in place from flat buffers (whose gaps hold NaN), and
    biased entries: the same rule, sentinels and NaN checks, on half as many examples."""

    def check(case: Case) -> None:
        checks = run_case(op, backend, case, device)
        failed = [check for check in checks or [] if not check.passed]
        assert not failed, f"{op} on {case.name}: {failed}"

    run_examples(max(1, examples // 2), check, cases(ragged_or_biased=True))


FIXED_RAGGED_OR_BIASED = [case for case in CASES if case.ragged or case.bias]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", TESTED, indirect=True)
def test_fixed_ragged_and_biased_cases_match_reference(backend, device, op):
    """The edges a draw may miss: a KV head holding only the chunk, one far longer than the others
    (a decode with empty splits), one query row, windows."""
    assert any(0 in (case.memories or ()) for case in FIXED_RAGGED_OR_BIASED)
    for case in FIXED_RAGGED_OR_BIASED:
        failed = [check for check in run_case(op, backend, case, device) or [] if not check.passed]
        assert not failed, f"{op} on {case.name}: {failed}"


def allowed(plain: torch.Tensor, expected: torch.Tensor) -> float:
    """The rule's bound for a result whose plain low-dtype computation is ``plain``."""
    return 2 * max_abs(plain.float() - expected.float()) + ABSOLUTE_FLOOR


def float32(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [tensor.float() for tensor in tensors]


@pytest.mark.parametrize("backend", TESTED, indirect=True)
def test_decode_equals_the_prefill_row_at_its_position(backend, examples, device):
    reference = backends.get("reference")

    def check(case: Case) -> None:
        if not backend.supports(case.spec("decode", device)):
            return
        q, k, v = case.tensors(device)
        row = case.last - 1  # any row of the chunk; `last` is drawn in 1..Lq
        seen = case.memory + row + 1  # keys up to and including the query's own
        query, keys, values = q[:, :, row : row + 1], k[:, :, :seen], v[:, :, :seen]
        from_prefill = backend.prefill(q, k, v, window=case.window).out[:, :, row : row + 1]
        from_decode = backend.decode(query, keys, values, window=case.window).out
        expected = reference.decode(*float32(query, keys, values), window=case.window).out
        plain, _, _ = plain_attention(query, keys, values, window=case.window)
        # Each is within the rule's bound of the reference, so within twice that of each other.
        assert max_abs(from_decode.float() - from_prefill.float()) <= 2 * allowed(plain, expected), case.name

    run_examples(max(1, examples // 2), check)


@pytest.mark.parametrize("backend", TESTED, indirect=True)
def test_gqa_equals_mha_on_repeated_heads(backend, examples, device):
    """Sharing KV heads must cost no accuracy: grouped and repeated heads agree at least as closely
    as either may differ from the reference. Also covers the ``out=None`` path."""
    reference = backends.get("reference")

    def check(case: Case) -> None:
        if not backend.supports(case.spec("scores", device)):
            return
        q, k, v = case.tensors(device)
        repeat = case.group
        k_mha, v_mha = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        expected = reference.prefill(*float32(q, k, v), window=case.window)
        plain_out, plain_lse, probabilities = plain_attention(q, k, v, window=case.window)

        grouped = backend.prefill(q, k, v, window=case.window)
        expanded = backend.prefill(q, k_mha, v_mha, window=case.window)
        assert max_abs(grouped.out.float() - expanded.out.float()) <= allowed(plain_out, expected.out)
        if grouped.lse is not None:
            assert max_abs(grouped.lse - expanded.lse) <= allowed(plain_lse, expected.lse)

        mass = backend.scores(q, k, window=case.window).mass
        per_head = backend.scores(q, k_mha, window=case.window).mass
        summed = per_head.reshape(case.batch, case.kv_heads, repeat, case.k_len).sum(dim=2)
        reference_mass = reference.scores(q, k, window=case.window).mass
        assert max_abs(mass - summed) <= allowed(plain_mass(probabilities, case.kv_heads, 0), reference_mass)

    run_examples(max(1, examples // 2), check, cases(min_group=2))


LARGER_CASES = [
    Case(1, 2, 3, 64, q_len=300, memory=700, dtype=torch.bfloat16, last=64, seed=11),
    Case(
        1, 1, 4, 128, q_len=257, memory=1000, window=300, dtype=torch.float16, strided=True, last=32, seed=12
    ),
]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", TESTED, indirect=True)
def test_larger_cases_match_reference(backend, device, op):
    """Many query and key blocks per program: the block-skipping and split arithmetic at scale."""
    for case in LARGER_CASES:
        failed = [check for check in run_case(op, backend, case, device) or [] if not check.passed]
        assert not failed, f"{op} on {case.name}: {failed}"


def test_reference_agrees_with_float64_math(device):
    """The oracle itself: float32 tiles against the same attention in float64."""
    reference = backends.get("reference")

    def check(case: Case) -> None:
        q, k, v = case.tensors(device)
        out, lse, probabilities = plain_attention(q, k, v, window=case.window, dtype=torch.float64)
        result = reference.prefill(*float32(q, k, v), window=case.window)
        torch.testing.assert_close(result.out, out.float(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(result.lse, lse.float(), rtol=1e-5, atol=1e-5)
        scored = plain_mass(probabilities, case.kv_heads, first=max(0, case.q_len - case.last))
        mass = reference.scores(q, k, last=case.last, window=case.window).mass
        torch.testing.assert_close(mass, scored, rtol=1e-5, atol=1e-5)

    run_examples(20, check)


def test_reference_agrees_with_float64_math_on_ragged_and_biased_memories(device):
    """The oracle on Segments and biases, against float64 math on the left-padded rectangle."""
    reference = backends.get("reference")

    def check(case: Case) -> None:
        q, k, v, bias = case.inputs(device)
        out, lse, probabilities = plain_attention(q, k, v, window=case.window, dtype=torch.float64, bias=bias)
        k32, v32 = upcast(k), None if v is None else v.float()
        result = reference.prefill(q.float(), k32, v32, window=case.window, bias=bias)
        torch.testing.assert_close(result.out, out.float(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(result.lse, lse.float(), rtol=1e-5, atol=1e-5)
        scored = plain_mass(probabilities, case.kv_heads, first=max(0, case.q_len - case.last))
        mass = reference.scores(q, k, last=case.last, window=case.window, bias=bias).mass
        torch.testing.assert_close(mass, scored, rtol=1e-5, atol=1e-5)

    run_examples(20, check, cases(ragged_or_biased=True))


def test_reference_bias_of_log_n_weighs_an_entry_n_times_by_hand():
    """One query (scale 1, head dim 1) and two memory keys of score 0 with values 0 and 3, then its
    own key (score 0, value 0): a bias log 3 on the first makes the weights 3 : 1 : 1, so the output
    is 3 / 5 and the LSE log 5; the first key's mass 3/5, the others' 1/5 each."""
    reference = backends.get("reference")
    q = torch.ones(1, 1, 1, 1)
    keys, values = torch.zeros(3, 1), torch.tensor([[0.0], [3.0], [0.0]])
    bias = torch.tensor([math.log(3), 0.0, 0.0])
    for k, v, b in [
        (keys[None, None], values[None, None], bias[None, None]),
        (Segments(keys, values, [0], [3], (1, 1), bias), None, None),
    ]:
        result = reference.prefill(q, k, v, scale=1.0, bias=b)
        torch.testing.assert_close(result.out, torch.tensor([[[[0.6]]]]))
        torch.testing.assert_close(result.lse, torch.tensor([[[math.log(5)]]]))
        mass = reference.scores(q, k, scale=1.0, bias=b).mass
        torch.testing.assert_close(mass, torch.tensor([[[0.6, 0.2, 0.2]]]))


@pytest.mark.parametrize("backend", ["reference", *TESTED], indirect=True)
def test_bias_of_log_n_equals_the_entry_repeated_n_times(backend, device):
    """A memory entry of bias log n attends as n copies of it: the same output and LSE, and the
    mass of the n copies summed (KV head 0's entry 2 carries log 3, KV head 1's entry 0 log 2)."""
    torch.manual_seed(0)
    q = torch.randn(1, 4, 5, 16, device=device)
    k, v = torch.randn(2, 1, 2, 12, 16, device=device)
    bias = torch.zeros(1, 2, 12, device=device)
    bias[0, 0, 2], bias[0, 1, 0] = math.log(3), math.log(2)
    copies = [[0, 1, 2, 2, 2, *range(3, 12)], [0, 0, *range(1, 12)]]
    segments = Segments(
        torch.cat([k[0, h, index] for h, index in enumerate(copies)]),
        torch.cat([v[0, h, index] for h, index in enumerate(copies)]),
        [0, len(copies[0])], [len(index) for index in copies], (1, 2),
    )  # fmt: skip
    for attend, rows in ((backend.prefill, q), (backend.decode, q[:, :, -1:])):
        biased, repeated = attend(rows, k, v, bias=bias), attend(rows, segments, None)
        torch.testing.assert_close(biased.out, repeated.out, rtol=1e-5, atol=1e-5)
        if biased.lse is not None:
            torch.testing.assert_close(biased.lse, repeated.lse, rtol=1e-5, atol=1e-5)
    biased = backend.scores(q, k, bias=bias, last=3).mass[0]
    repeated = backend.scores(q, segments, last=3).mass[0]
    folded = [
        torch.cat([repeated[0, :2], repeated[0, 2:5].sum(0, keepdim=True), repeated[0, 5:]]),
        torch.cat([repeated[1, 1:3].sum(0, keepdim=True), repeated[1, 3:]]),  # column 0: left padding
    ]
    torch.testing.assert_close(biased, torch.stack(folded), rtol=1e-5, atol=1e-6)


def test_visibility_masks_are_the_same_whether_made_or_cut_from_a_kept_one():
    """``visible`` keeps one mask per (rows, window) and cuts those for fewer keys from it: asked in
    any order, each mask equals the contract's rule (row i at key index i + lk - lq)."""
    for lq, lk, window in [(5, 40, None), (5, 9, None), (5, 5, None), (5, 40, 3), (5, 7, 3), (1, 12, None)]:
        query_at = [row + lk - lq for row in range(lq)]
        expected = torch.tensor(
            [[key <= at and (window is None or at - key < window) for key in range(lk)] for at in query_at]
        )
        assert torch.equal(visible(lq, lk, window), expected)
