"""``imdc`` (Incremental Memory + Decremental Chunk): ``im``'s memory, with chunks that shrink as it grows.

With ``N = ceil(L/c)`` and im's budgets ``m_0..m_{N-1}``, the chunks are ``c_0 = floor(L/N)`` and
``c_i = span - m_{i-1}`` for ``i >= 1``, where ``span = floor(L/N) + floor(mean(m_0..m_{N-2}))``:
memory + chunk stays flat at ``span``, so the peak is lower than ``fixed``'s ``M + c``.

The two floors leave up to 2N - 2 tokens over. The paper hands them all to the last chunk, which can
push its span past ``fixed``'s peak when the memory is small next to N (L=7, c=2, M=0 would give
chunks 1, 1, 1, 4). Here they go to the first chunk, which has ``span - c_0`` tokens of room below
the span; only what it can't take is spread one token per chunk, newest first. Where nothing is left
over (the paper's worked examples) the chunks are exactly the paper's.

Every chunk must be positive, which fails when the memory is much larger than the chunk
(e.g. L=8192, c=256, M=4096): that is a clear error suggesting ``im``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from schedules import Step, register
from schedules.fixed import count_steps
from schedules.incremental import IncrementalMemory, memory_curve


@register("imdc")
@dataclass(frozen=True, kw_only=True)
class DecrementalChunk(IncrementalMemory):
    name: ClassVar[str] = "imdc"

    def plan(self, length: int) -> list[Step]:
        steps = count_steps(length, self.chunk)
        memories = memory_curve(self.shape, self.memory, steps)
        if steps <= 1:
            return [Step(length, memory) for memory in memories]
        first = length // steps
        span = first + sum(memories[:-1]) // (steps - 1)
        chunks = [first] + [span - before for before in memories[:-1]]
        leftover = length - sum(chunks)
        into_first = min(leftover, span - first)
        chunks[0] += into_first
        for extra in range(leftover - into_first):
            chunks[-1 - extra % steps] += 1
        for i, chunk in enumerate(chunks):
            if chunk <= 0:
                raise ValueError(
                    f"{self.describe()} cannot plan {length} tokens: imdc needs a memory not much larger "
                    f"than the chunk. Its chunks are span - m_(i-1) with span = floor(L/N) + "
                    f"floor(mean(m_0..m_(N-2))) = {span}, and step i={i} of N={steps} follows a memory of "
                    f"{memories[i - 1]}, leaving {chunk} tokens. Use schedule 'im' or a larger chunk."
                )
        return [Step(chunk, memory) for chunk, memory in zip(chunks, memories, strict=True)]
