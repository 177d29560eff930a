import torch

from engine import peak_memory
from engine.peak_memory import begin_step, peak_bytes, reset_peak, step_peak

CPU = torch.device("cpu")


class FakeResidentSet:
    """The kernel's resident set and its high-water mark, which a restart sets to the current size."""

    def __init__(self, size: int) -> None:
        self.size = self.high = size

    def grow(self, amount: int) -> None:
        self.size += amount
        self.high = max(self.high, self.size)

    def shrink(self, amount: int) -> None:
        self.size -= amount

    def field(self, path: str, name: str) -> int:
        return {"VmHWM": self.high, "VmRSS": self.size}[name]

    def restart(self, device: torch.device) -> None:
        self.high = self.size


def test_a_regions_peak_survives_the_per_step_restarts(monkeypatch) -> None:
    kernel = FakeResidentSet(100)
    monkeypatch.setattr(peak_memory, "proc_field", kernel.field)
    monkeypatch.setattr(peak_memory, "_restart_counter", kernel.restart)
    reset_peak(CPU)
    kernel.grow(64)
    kernel.shrink(64)
    begin_step(CPU)
    assert (peak_bytes(CPU), step_peak(CPU)) == (164, 100)  # the region keeps it, the new step does not
    kernel.grow(10)
    begin_step(CPU)
    assert (peak_bytes(CPU), step_peak(CPU)) == (164, 110)
    reset_peak(CPU)  # a new region starts afresh
    assert peak_bytes(CPU) == 110
