from pathlib import Path

import pytest
import torch

from engine.peak_memory import begin_step, current_bytes, peak_bytes, reset_peak, step_peak

MIB = 2**20
pytestmark = pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(), reason="needs Linux's resettable peak resident set"
)


def test_a_regions_peak_survives_the_per_step_restarts() -> None:
    cpu = torch.device("cpu")
    reset_peak(cpu)
    before = current_bytes(cpu)
    transient = torch.ones(64 * MIB // 4)  # written, so resident; large enough to be unmapped when freed
    del transient
    begin_step(cpu)
    assert peak_bytes(cpu) >= before + 60 * MIB  # the enclosing region still sees it
    assert step_peak(cpu) < before + 32 * MIB  # the new step does not
