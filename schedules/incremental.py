"""``im`` (Incremental Memory): chunks as ``fixed``, a memory budget that grows to ``memory`` by a shape.

With ``N`` steps and ``a = floor(M/N)``, step ``i < N-1`` keeps ``m_i`` tokens (the paper's formulas,
truncated to int) and the last step keeps ``M``. Every shape starts at ``a`` and never decreases.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from schedules import ChunkedSchedule, Step, register
from schedules.fixed import fixed_chunks

# (i, N, M, a) -> m_i for 0 <= i < N-1. Integer arithmetic gives exactly the truncated real value,
# where floats could land just below an integer and truncate one too low.
SHAPES: dict[str, Callable[[int, int, int, int], int]] = {
    "linear": lambda i, n, m, a: a * (i + 1),  # a(i+1)
    "square": lambda i, n, m, a: a + (m - a) * i * i // (n - 1) ** 2,  # a + (M-a) i²/(N-1)²
    "sqrt": lambda i, n, m, a: a + math.isqrt((m - a) ** 2 * i // (n - 1)),  # a + (M-a) sqrt(i/(N-1))
    "inverse_convex": lambda i, n, m, a: m // (n - i),  # M/(N-i)
    "inverse_concave": lambda i, n, m, a: m + a + (-m // (i + 1)),  # M + a - M/(i+1)
}


def memory_curve(shape: str, memory: int, steps: int) -> list[int]:
    """The budget kept after each of ``steps`` steps: ``shape``'s m_i, then ``memory`` at the last."""
    if steps == 0:
        return []
    grow, first = SHAPES[shape], memory // steps
    return [grow(i, steps, memory, first) for i in range(steps - 1)] + [memory]


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
