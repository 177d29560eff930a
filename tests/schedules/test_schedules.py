"""The schedules against the paper's worked examples and peak spans, their invariants, and bad input."""

from __future__ import annotations

import math
import re
from contextlib import AbstractContextManager
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import schedules
from schedules import Step, peak_span
from schedules.incremental import SHAPES

SHAPE_NAMES = list(SHAPES)

lengths = st.integers(0, 40_000)
chunks = st.integers(1, 5_000)
memories = st.integers(0, 20_000)
# A chunk of 1 token over a long prompt makes tens of thousands of steps: slow on a busy machine, not wrong.
properties = settings(deadline=None)


def plan(name: str, length: int, memory: int, chunk: int, **options: str) -> list[Step]:
    return schedules.get(name, memory=memory, chunk=chunk, **options).plan(length)


def chunk_sizes(steps: list[Step]) -> list[int]:
    return [step.chunk for step in steps]


def budgets(steps: list[Step]) -> list[int | None]:
    return [step.memory for step in steps]


def raises_exactly(
    message: str, error: type[Exception] = ValueError
) -> AbstractContextManager[pytest.ExceptionInfo[Exception]]:
    return pytest.raises(error, match=f"^{re.escape(message)}$")


def imdc_paper(length: int, memory: int, chunk: int, shape: str) -> tuple[list[int], int]:
    """The paper's chunks before the rounding leftovers are placed, and how many tokens are left over."""
    m = budgets(plan("im", length, memory, chunk, shape=shape))
    n = len(m)
    span = length // n + sum(m[:-1]) // (n - 1)
    paper = [length // n] + [span - before for before in m[:-1]]
    return paper, length - sum(paper)


# The worked schedules of notes/imdc-paper.md §2.


@pytest.mark.parametrize(
    ("shape", "expected_memory", "expected_imdc_chunks"),
    [
        ("linear", [512, 1024, 1536, 2048], [2048, 2560, 2048, 1536]),
        ("square", [512, 682, 1194, 2048], [2048, 2332, 2162, 1650]),
        ("sqrt", [512, 1398, 1766, 2048], None),
        ("inverse_convex", [512, 682, 1024, 2048], None),
        ("inverse_concave", [512, 1536, 1877, 2048], None),
    ],
)
def test_worked_examples_8192(shape: str, expected_memory: list[int], expected_imdc_chunks: list[int] | None):
    im = plan("im", 8192, 2048, 2048, shape=shape)
    imdc = plan("imdc", 8192, 2048, 2048, shape=shape)
    assert chunk_sizes(im) == [2048] * 4
    assert budgets(im) == budgets(imdc) == expected_memory
    if expected_imdc_chunks is not None:
        assert chunk_sizes(imdc) == expected_imdc_chunks


def test_worked_example_32768_linear():
    im = plan("im", 32768, 1024, 1024)
    imdc = plan("imdc", 32768, 1024, 1024)
    assert budgets(im) == budgets(imdc) == [32 * (i + 1) for i in range(32)]
    assert chunk_sizes(imdc) == [1024] + [1536 - 32 * i for i in range(1, 31)] + [544]


@pytest.mark.parametrize(
    ("length", "chunk", "memory", "fixed_peak", "im_peak", "imdc_peak"),
    [  # the notes' table of 4 + m + c, less the 4 sinks
        (32768, 1024, 1024, 2048, 2016, 1536),
        (32768, 1024, 512, 1536, 1520, 1280),
        (32768, 8192, 8192, 16384, 14336, 12288),
        (8192, 2048, 2048, 4096, 3584, 3072),
    ],
)
def test_peak_span_table(length: int, chunk: int, memory: int, fixed_peak: int, im_peak: int, imdc_peak: int):
    assert peak_span(plan("fixed", length, memory, chunk)) == fixed_peak
    assert peak_span(plan("im", length, memory, chunk)) == im_peak
    assert peak_span(plan("imdc", length, memory, chunk)) == imdc_peak
    assert peak_span(plan("full", length, memory, chunk)) == length


def test_peak_span_caps_memory_at_tokens_seen():
    assert peak_span([]) == 0
    assert peak_span([Step(10, 1000), Step(5, 1000)]) == 15
    assert peak_span([Step(10, None), Step(5, 3), Step(7, 0)]) == 15


# Invariants over random lengths, chunks and memories (0, L < c and M > L included).


@properties
@given(lengths, memories, chunks, st.sampled_from(["full", "fixed", *(f"im:{s}" for s in SHAPE_NAMES)]))
def test_chunks_are_positive_ints_summing_to_length(length: int, memory: int, chunk: int, which: str):
    name, _, shape = which.partition(":")
    steps = plan(name, length, memory, chunk, **({"shape": shape} if shape else {}))
    assert all(type(step.chunk) is int and step.chunk > 0 for step in steps)
    assert sum(chunk_sizes(steps)) == length
    assert len(steps) == (1 if name == "full" and length else math.ceil(length / chunk))


@properties
@given(lengths, memories, chunks)
def test_fixed_keeps_memory_constant(length: int, memory: int, chunk: int):
    steps = plan("fixed", length, memory, chunk)
    assert budgets(steps) == [memory] * len(steps)
    assert chunk_sizes(steps)[:-1] == [chunk] * (len(steps) - 1)


@properties
@given(lengths, memories, chunks, st.sampled_from(SHAPE_NAMES))
def test_im_memory_grows_from_a_to_memory(length: int, memory: int, chunk: int, shape: str):
    steps = plan("im", length, memory, chunk, shape=shape)
    m = budgets(steps)
    assert chunk_sizes(steps) == chunk_sizes(plan("fixed", length, memory, chunk))
    assert m == sorted(m)
    if steps:
        assert m[0] == math.ceil(memory / len(steps))
        assert m[-1] == memory
        assert all(type(budget) is int for budget in m)
        assert memory == 0 or min(m) >= 1


@pytest.mark.parametrize("name", ["im", "imdc"])
@pytest.mark.parametrize("shape", SHAPE_NAMES)
def test_growth_never_collapses_when_steps_exceed_memory(name: str, shape: str):
    # N = 274 steps for M = 256: the paper's a = floor(M/N) = 0 kept nothing until the last step.
    m = budgets(plan(name, 70_000, 256, 256, shape=shape))
    assert len(m) == 274 and min(m) >= 1 and m[-1] == 256
    if shape == "linear":  # grows by the exact fraction M/N per step
        assert m[:8] == [max(1, 256 * (i + 1) // 274) for i in range(8)] and m[136] == 128


@properties
@given(lengths, memories, chunks, st.sampled_from(SHAPE_NAMES))
def test_imdc_flat_span_within_fixed_peak_or_clear_error(length: int, memory: int, chunk: int, shape: str):
    try:
        steps = plan("imdc", length, memory, chunk, shape=shape)
    except ValueError as error:
        assert "imdc needs a memory not much larger than the chunk" in str(error)
        paper, _ = imdc_paper(length, memory, chunk, shape)
        assert min(paper[1:]) <= 2, "refused only where the paper's own chunks (nearly) vanish"
        return
    c, m = chunk_sizes(steps), budgets(steps)
    assert all(size > 0 for size in c) and sum(c) == length
    assert m == budgets(plan("im", length, memory, chunk, shape=shape))
    assert peak_span(steps) <= peak_span(plan("fixed", length, memory, chunk))
    if len(steps) < 3:
        return
    paper, leftover = imdc_paper(length, memory, chunk, shape)
    span = m[0] + paper[1]
    middle = [m[i - 1] + c[i] for i in range(1, len(steps) - 1)]
    if leftover <= span - paper[0]:  # the first chunk takes all leftovers: the paper's flat span exactly
        assert c[1:] == paper[1:] and c[0] == paper[0] + leftover and set(middle) == {span}
    else:  # memory tiny next to N: the rest spread one token per chunk
        assert all(span <= s <= span + 2 for s in middle)


def test_imdc_leftovers_never_raise_the_peak_above_fixed():
    # The paper's formula gives chunks 1, 1, 1, 4 here: a span of 4 against fixed's 2.
    assert chunk_sizes(plan("imdc", 7, 0, 2)) == [1, 2, 2, 2]
    assert peak_span(plan("imdc", 7, 0, 2)) == peak_span(plan("fixed", 7, 0, 2)) == 2
    steps = plan("imdc", 130543, 32, 256, shape="inverse_concave")
    assert peak_span(steps) <= peak_span(plan("fixed", 130543, 32, 256)) == 288


@properties
@given(st.integers(0, 10**6), st.integers(2, 3000), st.data())
def test_integer_shapes_equal_the_truncated_formulas(memory: int, steps: int, data: st.DataObject):
    i = data.draw(st.integers(0, steps - 2))
    n, m = steps, memory
    a = m / n
    real = {
        "linear": a * (i + 1),
        "square": a + (m - a) * i**2 / (n - 1) ** 2,
        "sqrt": a + (m - a) * math.sqrt(i / (n - 1)),
        "inverse_convex": m / (n - i),
        "inverse_concave": m + a - m / (i + 1),
    }
    for shape, value in real.items():
        exact = SHAPES[shape](i, n, m, Fraction(m, n))
        # Floats may round across an integer; only there may int(float) differ by one.
        assert exact == int(value) or abs(value - round(value)) < 1e-6 * max(1, value), shape


# Degenerate inputs.


@pytest.mark.parametrize("name", ["full", "fixed", "im", "imdc"])
def test_empty_prompt_gives_empty_plan(name: str):
    assert plan(name, 0, 64, 16) == []


@pytest.mark.parametrize("name", ["fixed", "im", "imdc"])
@pytest.mark.parametrize("length", [1, 15, 16])
def test_prompt_within_one_chunk_is_one_step_with_full_budget(name: str, length: int):
    assert plan(name, length, 64, 16) == [Step(length, 64)]


def test_full_is_one_step_keeping_everything():
    assert plan("full", 100, 8, 4) == [Step(100, None)]
    assert schedules.get("full").plan(7) == [Step(7, None)]


@pytest.mark.parametrize("name", ["fixed", "im", "imdc"])
def test_zero_memory(name: str):
    steps = plan(name, 100, 0, 16)
    assert budgets(steps) == [0] * 7 and sum(chunk_sizes(steps)) == 100


@pytest.mark.parametrize("name", ["fixed", "im"])
def test_memory_larger_than_prompt(name: str):
    steps = plan(name, 100, 1000, 16)
    assert budgets(steps)[-1] == 1000 and sum(chunk_sizes(steps)) == 100


def test_imdc_error_names_the_step_and_suggests_im():
    with pytest.raises(ValueError) as error:
        plan("imdc", 8192, 4096, 256)
    message = str(error.value)
    assert "imdc(linear) M=4096 c=256 cannot plan 8192 tokens" in message
    assert "floor(L/N) + floor(mean(m_0..m_(N-2))) = 2304" in message
    assert "imdc needs a memory not much larger than the chunk" in message
    assert "step i=18 of N=32 follows a memory of 2304, leaving 0 tokens" in message
    assert "Use schedule 'im' or a larger chunk." in message


def test_describe():
    assert schedules.get("imdc", memory=1024, chunk=1024).describe() == "imdc(linear) M=1024 c=1024"
    assert schedules.get("im", memory=8, chunk=4, shape="sqrt").describe() == "im(sqrt) M=8 c=4"
    assert schedules.get("fixed", memory=8, chunk=4).describe() == "fixed M=8 c=4"
    assert schedules.get("full", memory=8, chunk=4).describe() == "full"


# Bad input: one clear ValueError naming the knob.


@pytest.mark.parametrize("name", ["full", "fixed", "im", "imdc"])
@pytest.mark.parametrize(
    ("knobs", "message"),
    [
        ({"memory": 8, "chunk": 0}, "chunk must be a positive number of tokens, got 0"),
        ({"memory": 8, "chunk": -3}, "chunk must be a positive number of tokens, got -3"),
        ({"memory": 8, "chunk": 2.5}, "chunk must be a positive number of tokens, got 2.5"),
        ({"memory": 8, "chunk": True}, "chunk must be a positive number of tokens, got True"),
        ({"memory": -1, "chunk": 4}, "memory must be a non-negative number of tokens, got -1"),
        ({"memory": "8", "chunk": 4}, "memory must be a non-negative number of tokens, got '8'"),
    ],
)
def test_bad_knobs(name: str, knobs: dict[str, object], message: str):
    with raises_exactly(message):
        schedules.get(name, **knobs)


@pytest.mark.parametrize("name", ["full", "fixed", "im", "imdc"])
def test_negative_length(name: str):
    with raises_exactly("prompt length must be a non-negative number of tokens, got -1"):
        plan(name, -1, 8, 4)


@pytest.mark.parametrize(
    ("name", "takes"),
    [("fixed", "memory, chunk"), ("im", "memory, chunk, shape"), ("imdc", "memory, chunk, shape")],
)
def test_missing_knob_lists_options(name: str, takes: str):
    with raises_exactly(f"schedule '{name}' needs chunk; options: {takes}"):
        schedules.get(name, memory=8)


def test_unknown_option_lists_options():
    with raises_exactly("schedule 'fixed' has no option shape; options: memory, chunk"):
        schedules.get("fixed", memory=8, chunk=4, shape="sqrt")
    with raises_exactly("schedule 'imdc' has no option rate; options: memory, chunk, shape"):
        schedules.get("imdc", memory=8, chunk=4, rate=2)


@pytest.mark.parametrize("name", ["im", "imdc"])
def test_unknown_shape_lists_shapes(name: str):
    allowed = "linear, square, sqrt, inverse_convex, inverse_concave"
    with raises_exactly(f"unknown {name} shape 'cubic'; allowed: {allowed}"):
        schedules.get(name, memory=8, chunk=4, shape="cubic")


def test_step_rejects_empty_chunk_and_negative_memory():
    with raises_exactly("a step's chunk must be a positive number of tokens, got 0"):
        Step(0, None)
    with raises_exactly("a step's memory must be a non-negative number of tokens, got -2"):
        Step(4, -2)


# The registry.


def test_available_lists_the_built_ins():
    assert {"full", "fixed", "im", "imdc"} <= set(schedules.available())


def test_unknown_schedule_lists_the_known_ones():
    known = "fixed, full, im, imdc (or load one with --plugin MODULE)"
    with raises_exactly(f"unknown schedule 'fm'; known: {known}", schedules.UnknownNameError):
        schedules.get("fm", memory=8, chunk=4)
