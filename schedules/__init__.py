"""Prefill schedules: how many prompt tokens each step feeds and how much memory is kept after it.

A schedule is pure integer arithmetic: ``get(name, memory=M, chunk=c, **options).plan(L)`` returns
the steps of a prompt of ``L`` tokens. Sinks are never counted in a step's memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

from engine.registry import Registry, UnknownNameError


def require_tokens(what: str, value: object, *, positive: bool) -> None:
    """Raise a clear ValueError unless ``value`` is a (positive or non-negative) int count of tokens."""
    if isinstance(value, bool) or not isinstance(value, int) or value < (1 if positive else 0):
        kind = "a positive" if positive else "a non-negative"
        raise ValueError(f"{what} must be {kind} number of tokens, got {value!r}")


@dataclass(frozen=True)
class Step:
    """Feed ``chunk`` new prompt tokens, then keep at most ``memory`` of all tokens seen (None: all)."""

    chunk: int
    memory: int | None

    def __post_init__(self) -> None:
        require_tokens("a step's chunk", self.chunk, positive=True)
        if self.memory is not None:
            require_tokens("a step's memory", self.memory, positive=False)


class Schedule(Protocol):
    def plan(self, length: int) -> list[Step]: ...

    def describe(self) -> str: ...


@dataclass(frozen=True, kw_only=True)
class ChunkedSchedule:
    """Base of the schedules that feed chunks of about ``chunk`` tokens under a ``memory`` budget."""

    memory: int
    chunk: int
    name: ClassVar[str]

    def __post_init__(self) -> None:
        require_tokens("chunk", self.chunk, positive=True)
        require_tokens("memory", self.memory, positive=False)

    def plan(self, length: int) -> list[Step]:
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.name} M={self.memory} c={self.chunk}"


def peak_span(plan: Sequence[Step]) -> int:
    """The most tokens any step attends over: memory kept before it plus its chunk (sinks excluded)."""
    peak = seen = kept = 0
    for step in plan:
        peak = max(peak, kept + step.chunk)
        seen += step.chunk
        kept = seen if step.memory is None else min(step.memory, seen)
    return peak


_registry: Registry[Schedule] = Registry("schedule", entry_point_group="engine.schedules")
register = _registry.register
factory = _registry.factory
available = _registry.available
get = _registry.get


__all__ = [
    "ChunkedSchedule",
    "Schedule",
    "Step",
    "UnknownNameError",
    "available",
    "factory",
    "get",
    "peak_span",
    "register",
    "require_tokens",
]

# Built-in schedules register themselves on import.
from schedules import fixed as _fixed  # noqa: E402,F401
from schedules import full as _full  # noqa: E402,F401
from schedules import imdc as _imdc  # noqa: E402,F401
from schedules import incremental as _incremental  # noqa: E402,F401
