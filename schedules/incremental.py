"""``im`` (Incremental Memory): chunks as ``fixed``, a memory budget that grows to ``memory`` by a shape.

With ``N`` steps, step ``i < N-1`` keeps ``m_i`` tokens by the paper's formulas and the last step
keeps ``M``. The paper starts every shape at ``a = floor(M/N)``; here ``a`` is the exact fraction
``M/N`` and each ``m_i`` is the formula truncated to an integer, floored at ``ceil(M/N)``. Where
``M/N`` is an integer (the paper's settings) both give exactly the paper's values. Where it is not,
the paper's floor makes the whole curve collapse to 0 once ``N > M`` (``M = 256, c = 256`` on any
prompt over 65,536 tokens kept nothing until the last step); the exact fraction grows by ``M/N`` per
step instead, and no step keeps fewer than ``ceil(M/N)`` tokens (at least 1 when ``M > 0``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import ClassVar

from schedules import ChunkedSchedule, Step, register
from schedules.fixed import fixed_chunks


def _floor_sqrt_sum(a: Fraction, square: Fraction) -> int:
    """floor(a + sqrt(square)) exactly, for a >= 0 and square >= 0."""
    value = math.floor(a + math.sqrt(square))
    while value + 1 - a <= 0 or (value + 1 - a) ** 2 <= square:
        value += 1
    while value - a > 0 and (value - a) ** 2 > square:
        value -= 1
    return value


# (i, N, M, a) -> m_i for 0 <= i < N-1, with a = M/N as an exact fraction. Exact rational arithmetic
# gives exactly the truncated real value, where floats could land just below an integer.
SHAPES: dict[str, Callable[[int, int, int, Fraction], int]] = {
    "linear": lambda i, n, m, a: math.floor(a * (i + 1)),  # a(i+1)
    "square": lambda i, n, m, a: math.floor(
        a + (m - a) * Fraction(i * i, (n - 1) ** 2)
    ),  # a + (M-a) i²/(N-1)²
    "sqrt": lambda i, n, m, a: _floor_sqrt_sum(
        a, (m - a) ** 2 * Fraction(i, n - 1)
    ),  # a + (M-a) sqrt(i/(N-1))
    "inverse_convex": lambda i, n, m, a: m // (n - i),  # M/(N-i)
    "inverse_concave": lambda i, n, m, a: math.floor(m + a - Fraction(m, i + 1)),  # M + a - M/(i+1)
}


def memory_curve(shape: str, memory: int, steps: int) -> list[int]:
    """The budget kept after each of ``steps`` steps: ``shape``'s m_i, then ``memory`` at the last."""
    if steps == 0:
        return []
    grow, share = SHAPES[shape], Fraction(memory, steps)
    least = math.ceil(share)
    return [max(least, grow(i, steps, memory, share)) for i in range(steps - 1)] + [memory]


@register("im")
@dataclass(frozen=True, kw_only=True)
class IncrementalMemory(ChunkedSchedule):
    shape: str = "linear"
    name: ClassVar[str] = "im"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.shape not in SHAPES:
            raise ValueError(f"unknown {self.name} shape {self.shape!r}; allowed: {', '.join(SHAPES)}")

    def plan(self, length: int) -> list[Step]:
        chunks = fixed_chunks(length, self.chunk)
        memories = memory_curve(self.shape, self.memory, len(chunks))
        return [Step(chunk, memory) for chunk, memory in zip(chunks, memories, strict=True)]

    def describe(self) -> str:
        return f"{self.name}({self.shape}) M={self.memory} c={self.chunk}"
