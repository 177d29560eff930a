"""``full``: the whole prompt in one step, nothing dropped (the uncompressed baseline)."""

from __future__ import annotations

from dataclasses import dataclass

from schedules import Step, register, require_tokens


@register("full")
@dataclass(frozen=True, kw_only=True)
class Full:
    """Takes ``memory`` and ``chunk`` like every schedule, so callers need no special case; ignores them."""

    memory: int | None = None
    chunk: int | None = None

    def __post_init__(self) -> None:
        if self.chunk is not None:
            require_tokens("chunk", self.chunk, positive=True)
        if self.memory is not None:
            require_tokens("memory", self.memory, positive=False)

    def plan(self, length: int) -> list[Step]:
        require_tokens("prompt length", length, positive=False)
        return [Step(length, None)] if length else []

    def describe(self) -> str:
        return "full"
