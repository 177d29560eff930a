"""Timing and peak memory of one measured region, the same way for every tool.

On CUDA: CUDA events and ``torch.cuda.max_memory_allocated``; on the CPU: ``time.perf_counter`` and
the process's peak resident set. Both reset the peak first (``engine.peak_memory``). ``repeated``
runs once to warm up, then ``repeat`` times, and keeps the median time.
"""

from __future__ import annotations

import contextlib
import resource
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from engine.peak_memory import NotEnoughMemoryError, current_bytes, peak_bytes, proc_field, reset_peak


@dataclass(frozen=True)
class Timing:
    seconds: float
    peak_bytes: int  # the allocator's (CUDA) or the process's (CPU) peak during the region
    baseline_bytes: int  # what was already in use when the region began (weights, libraries)

    @property
    def added_bytes(self) -> int:
        """Memory the region itself needed on top of what was in use before it."""
        return max(0, self.peak_bytes - self.baseline_bytes)


class DoesNotFit(Exception):
    """A measured run ran out of memory (CUDA) or past the CPU memory limit."""


class Stopwatch:
    """``with Stopwatch(device) as watch: ...`` then ``watch.timing``."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.timing: Timing | None = None

    def __enter__(self) -> Stopwatch:
        reset_peak(self.device)
        self._baseline = current_bytes(self.device)
        if self.device.type == "cuda":
            self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            self._events[0].record()
        else:
            self._started = time.perf_counter()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if exc_info[0] is not None:
            return
        if self.device.type == "cuda":
            self._events[1].record()
            torch.cuda.synchronize(self.device)
            seconds = self._events[0].elapsed_time(self._events[1]) / 1e3
        else:
            seconds = time.perf_counter() - self._started
        self.timing = Timing(seconds, peak_bytes(self.device), self._baseline)


def repeated(run: Callable[[], dict[str, Timing]], repeat: int) -> dict[str, Timing]:
    """Call ``run`` (which times one or more named phases) once to warm up, then ``repeat`` times:
    per phase the median time, the highest peak and the lowest baseline."""
    if repeat < 1:
        raise ValueError(f"--repeat must be at least 1, got {repeat}")
    run()
    runs = [run() for _ in range(repeat)]
    return {
        phase: Timing(
            statistics.median(r[phase].seconds for r in runs),
            max(r[phase].peak_bytes for r in runs),
            min(r[phase].baseline_bytes for r in runs),
        )
        for phase in runs[0]
    }


def measure(run: Callable[[], object], device: torch.device | str, repeat: int) -> Timing:
    """Warm-up, then the median of ``repeat`` timed calls of ``run``."""

    def once() -> dict[str, Timing]:
        with Stopwatch(device) as watch:
            run()
        return {"run": watch.timing}

    return repeated(once, repeat)["run"]


@contextlib.contextmanager
def memory_limit(device: torch.device | str, limit_bytes: int | None) -> Iterator[None]:
    """Turn running out of memory into ``DoesNotFit``.

    On CUDA the device's own size is the limit. On the CPU the operating system would rather kill
    the process than fail an allocation, so the address space may grow by at most ``limit_bytes``
    (None: no limit) while the block runs; an allocation past it fails and is reported instead.
    """
    device = torch.device(device)
    previous = None
    size = proc_field("/proc/self/status", "VmSize")
    if device.type != "cuda" and limit_bytes is not None and size is not None:
        previous = resource.getrlimit(resource.RLIMIT_AS)
        hard = previous[1]
        cap = size + limit_bytes if hard == resource.RLIM_INFINITY else min(size + limit_bytes, hard)
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    except NotEnoughMemoryError as error:  # refused up front by the engine's own estimate
        raise DoesNotFit(str(error)) from None
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as error:
        # The CPU allocator reports a refused allocation as a RuntimeError ("can't allocate memory").
        out_of_memory = isinstance(error, (torch.OutOfMemoryError, MemoryError)) or "allocate" in str(error)
        if not out_of_memory:
            raise
        if device.type == "cuda":
            torch.cuda.empty_cache()
        lines = str(error).strip().splitlines()
        raise DoesNotFit(lines[0] if lines else "out of memory") from None
    finally:
        if previous is not None:
            resource.setrlimit(resource.RLIMIT_AS, previous)
