"""Memory in use and its peak for one measured region: the allocator on CUDA, the resident set on the CPU."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import resource
from pathlib import Path

import torch

# The highest peak read when a step restarted the counter, so that the peak of an enclosing region
# (a benchmark timing a whole prefill) survives the per-step restarts of ``begin_step``.
_region_peak = 0


def reset_peak(device: torch.device) -> None:
    """Begin a measured region: the peak is counted from here (on the CPU, after handing freed heap
    memory back to the OS, which costs time; call it outside what is timed)."""
    global _region_peak
    _region_peak = 0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    else:
        release_freed_memory()
    _restart_counter(device)


def begin_step(device: torch.device) -> None:
    """Begin a step inside a region: ``step_peak`` counts from here, ``peak_bytes`` still from the
    region's start. Cheap enough to call for every prefill chunk."""
    global _region_peak
    _region_peak = max(_region_peak, step_peak(device))
    _restart_counter(device)


def step_peak(device: torch.device) -> int:
    """The peak since the latest ``begin_step`` (or ``reset_peak``)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    peak = proc_field("/proc/self/status", "VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_bytes(device: torch.device) -> int:
    """The peak since the latest ``reset_peak``: the allocator's on CUDA, the resident set's on the CPU."""
    return max(_region_peak, step_peak(device))


def _restart_counter(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    # Linux resets the process's VmHWM when "5" is written to clear_refs; elsewhere the peak only grows.
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def current_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return proc_field("/proc/self/status", "VmRSS") or 0


class NotEnoughMemoryError(ValueError):
    """A run would need more memory than the device has free; refused before it starts."""


def require_available(needed: int, device: torch.device, what: str, fix: str) -> None:
    """Refuse, with ``fix`` as the advice, when ``needed`` bytes exceed what ``device`` has free."""
    free = available_bytes(device)
    if free is not None and needed > free:
        raise NotEnoughMemoryError(
            f"{what} needs about {needed / 2**30:.1f} GiB but {device.type} has {free / 2**30:.1f} GiB "
            f"available; {fix}"
        )


def available_bytes(device: torch.device) -> int | None:
    """Memory the device can still give: free CUDA memory, or the system's MemAvailable on the CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return proc_field("/proc/meminfo", "MemAvailable")


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS: glibc keeps it resident otherwise, so the resident set
    (and so the CPU peak) would carry what earlier work freed."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def proc_field(path: str, name: str) -> int | None:
    """A "Name:  123 kB" field of a /proc file (``/proc/self/status``, ``/proc/meminfo``), in bytes."""
    with contextlib.suppress(OSError):
        for line in Path(path).read_text().splitlines():
            if line.startswith(f"{name}:"):
                return int(line.split()[1]) * 1024
    return None
