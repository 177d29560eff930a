"""Fixtures for the backend suite: the device, the backend under test, and how many cases it gets.

Tests take the backend indirectly: ``@pytest.mark.parametrize("backend", names, indirect=True)``.
"""

from __future__ import annotations

import os

import pytest
import torch

import backends
from backends import Backend

# Interpreted Triton kernels take a few tenths of a second a case on a CPU, the rest milliseconds.
INTERPRETED_EXAMPLES = 25
EXAMPLES = 40


@pytest.fixture(scope="session")
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> Backend:
    """The registered backend named by the test's parameter, or a skip when it cannot be imported."""
    try:
        return backends.get(request.param)
    except ImportError as error:
        pytest.skip(f"backend {request.param!r} unavailable: {error}")


@pytest.fixture
def examples(backend: Backend) -> int:
    """Hypothesis examples per test: ``BACKEND_EXAMPLES`` when set, else few for interpreted kernels
    (a GPU run gets the full count without any change)."""
    configured = os.environ.get("BACKEND_EXAMPLES")
    if configured:
        return int(configured)
    return INTERPRETED_EXAMPLES if getattr(backend, "interpreted", False) else EXAMPLES
