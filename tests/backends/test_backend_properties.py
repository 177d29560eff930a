"""Every registered backend against the float32 reference, on cases drawn by Hypothesis.

A backend that does not support a case (``supports`` says no) passes it: unsupported is a result.
"""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

import backends
from tools.check_backends import ABSOLUTE_FLOOR, DTYPES, OPS, Case, plain_attention, plain_mass, run_case

TESTED = [name for name in backends.available() if name not in ("auto", "reference")]


@st.composite
def cases(draw: st.DrawFn, min_group: int = 1) -> Case:
    """Small, odd-sized problems: memory 0 included, GQA groups up to 4 (3 as in the default model)."""
    q_len = draw(st.integers(1, 100))
    memory = draw(st.integers(0, 150))
    return Case(
        batch=draw(st.integers(1, 2)),
        kv_heads=draw(st.integers(1, 2)),
        group=draw(st.sampled_from([group for group in (1, 2, 3, 4) if group >= min_group])),
        head_dim=draw(st.sampled_from([16, 32, 64, 128])),
        q_len=q_len,
        memory=memory,
        window=draw(st.none() | st.integers(1, q_len + memory)),
        dtype=draw(st.sampled_from(list(DTYPES.values()))),
        strided=draw(st.booleans()),
        last=draw(st.integers(1, q_len)),
        seed=draw(st.integers(0, 2**16)),
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
