"""The Triton backend's own promises: what it supports, how it refuses bad input, how it imports."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import backends
from backends import AttentionSpec, Segments

triton_backend = pytest.importorskip("backends.triton")
REPOSITORY = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def triton() -> backends.Backend:
    return backends.get("triton")


def test_supports_cpu_exactly_when_interpreted(triton):
    spec = AttentionSpec(head_dim=64, group=3, dtype=torch.bfloat16, device="cpu", window=128, stats=True)
    assert triton.supports(spec) == triton_backend.INTERPRETED
    cuda = AttentionSpec(head_dim=128, group=3, dtype=torch.float16, device="cuda")
    assert triton.supports(cuda) == torch.cuda.is_available()
    ragged = AttentionSpec(64, 3, torch.float16, "cpu", stats=True, segments=True, bias=True)
    assert triton.supports(ragged) == triton_backend.INTERPRETED


@pytest.mark.parametrize(
    ("head_dim", "dtype", "window"),
    [
        (80, torch.float16, None),
        (512, torch.float16, None),
        (64, torch.float64, None),
        (64, torch.float32, 0),
    ],
)
def test_says_no_to_what_it_cannot_run(triton, head_dim, dtype, window):
    for device in ("cpu", "cuda"):
        assert not triton.supports(AttentionSpec(head_dim, 2, dtype, device, window))


@pytest.mark.parametrize(
    ("shapes", "options", "message"),
    [
        (((1, 2, 9, 16), (1, 2, 8, 16)), {}, "cannot serve"),
        (((1, 3, 4, 16), (1, 2, 8, 16)), {}, "not a multiple"),
        (((1, 2, 4, 24), (1, 2, 8, 24)), {}, "head dim 24"),
        (((1, 2, 4, 16), (1, 2, 8, 16)), {"window": 0}, "window"),
        (((1, 2, 4, 16), (1, 2, 8, 16)), {"out": torch.empty(1, 2, 4, 8)}, "out must be"),
    ],
)
def test_rejects_bad_input_with_a_message(triton, device, shapes, options, message):
    q_shape, k_shape = shapes
    q, k = torch.randn(q_shape, device=device), torch.randn(k_shape, device=device)
    with pytest.raises(ValueError, match=message):
        triton.prefill(q, k, k.clone(), **options)


def _segments(lengths: list[int], rows: int, device: str, **changes) -> Segments:
    keys = torch.randn(rows, 16, device=device)
    offsets = [sum(lengths[:s]) for s in range(len(lengths))]
    fields = {"offsets": offsets, "lengths": lengths, "shape": (1, len(lengths))} | changes
    return Segments(keys, keys.clone(), **fields)


@pytest.mark.parametrize(
    ("segments", "options", "message"),
    [
        ({"lengths": [4, 2]}, {}, "cannot serve 3 queries"),
        ({"lengths": [4, 9]}, {}, "outside the 12 rows"),
        ({"lengths": [4, 5], "offsets": [0]}, {}, "need 2 offsets and lengths"),
        ({"lengths": [4, 5], "shape": (2, 1)}, {}, "batch 2"),
        ({"lengths": [4, 5], "bias": torch.zeros(11)}, {}, "bias must be a float tensor of shape \\[12\\]"),
        ({"lengths": [4, 5]}, {"bias": torch.zeros(1, 2, 5)}, "Segments.bias"),
    ],
)
def test_rejects_bad_segments_with_a_message(triton, device, segments, options, message):
    q = torch.randn(1, 2, 3, 16, device=device)
    with pytest.raises(ValueError, match=message):
        triton.prefill(q, _segments(rows=12, device=device, **segments), None, **options)


def test_rejects_a_bias_of_the_wrong_shape(triton, device):
    q, k = torch.randn(1, 2, 4, 16, device=device), torch.randn(1, 2, 8, 16, device=device)
    with pytest.raises(ValueError, match="bias must be"):
        triton.prefill(q, k, k.clone(), bias=torch.zeros(1, 2, 7, device=device))


def test_scores_are_deterministic(triton, device):
    q, k = torch.randn(1, 6, 40, 32, device=device), torch.randn(1, 2, 90, 32, device=device)
    first, second = triton.scores(q, k, window=50), triton.scores(q, k, window=50)
    assert torch.equal(first.mass, second.mass)
    assert torch.equal(first.count, second.count)


def test_decode_merges_many_splits(triton, device):
    """A long cache is cut into several splits (one program each) whose partial sums are merged."""
    q = torch.randn(1, 3, 1, 64, device=device)
    k, v = torch.randn(2, 1, 1, 300, 64, device=device)
    result = triton.decode(q, k, v)
    expected = backends.get("reference").decode(q, k, v)
    torch.testing.assert_close(result.out, expected.out, rtol=0, atol=1e-5)
    torch.testing.assert_close(result.lse, expected.lse, rtol=0, atol=1e-5)


def _python(code: str, **environment: str | None) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter with the repository importable; a None value unsets a variable."""
    env = {**os.environ, **environment}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPOSITORY), os.environ.get("PYTHONPATH")]))
    env = {key: value for key, value in env.items() if value is not None}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_import_without_triton_names_the_install_command():
    result = _python("import sys; sys.modules['triton'] = None; import backends.triton")
    assert result.returncode != 0
    assert "ImportError" in result.stderr
    assert "pip install triton" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU fallback only applies without a GPU")
def test_explicit_interpreter_off_falls_back_to_reference_on_cpu():
    code = (
        "import torch, backends\n"
        "spec = backends.AttentionSpec(64, 3, torch.float32, 'cpu')\n"
        "print(backends.resolve('triton', spec).name)\n"
    )
    result = _python(code, TRITON_INTERPRET="0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "reference"
    assert "does not support" in result.stderr and "TRITON_INTERPRET=1" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter is only switched on without a GPU")
def test_import_switches_the_interpreter_on_without_a_gpu():
    code = "import os, backends.triton as t; print(os.environ['TRITON_INTERPRET'], t.INTERPRETED)"
    result = _python(code, TRITON_INTERPRET=None)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1", "True"]
