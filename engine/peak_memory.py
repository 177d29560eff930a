"""Memory in use and its peak for one measured region: the allocator on CUDA, the resident set on the CPU."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import resource
from pathlib import Path

import torch


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return
    release_freed_memory()
    # Linux resets the process's VmHWM when "5" is written to clear_refs; elsewhere the peak only grows.
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    peak = proc_field("/proc/self/status", "VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return proc_field("/proc/self/status", "VmRSS") or 0


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
