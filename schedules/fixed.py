"""``fixed`` (FM): chunks of ``chunk`` tokens, memory compressed back to ``memory`` after every step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from schedules import ChunkedSchedule, Step, register, require_tokens


def count_steps(length: int, chunk: int) -> int:
    """N = ceil(L / c), the number of steps of every chunked schedule."""
    require_tokens("prompt length", length, positive=False)
    return -(-length // chunk)


def fixed_chunks(length: int, chunk: int) -> list[int]:
    """``chunk``-sized pieces of ``length`` tokens; the last one holds the remainder."""
    require_tokens("prompt length", length, positive=False)
    full_chunks, remainder = divmod(length, chunk)
    return [chunk] * full_chunks + ([remainder] if remainder else [])


@register("fixed")
@dataclass(frozen=True, kw_only=True)
class FixedMemory(ChunkedSchedule):
    name: ClassVar[str] = "fixed"

    def plan(self, length: int) -> list[Step]:
        return [Step(chunk, self.memory) for chunk in fixed_chunks(length, self.chunk)]
