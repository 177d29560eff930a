"""``python -m tools.check_backends``: the table it prints and the exit code it returns."""

from __future__ import annotations

import json

import pytest
import torch

import backends
from tools import check_backends
from tools.check_backends import main

TINY = "^b1-kv1-g1-d16-q7-m0-"  # one small case, cheap even for interpreted kernels


def table_rows(output: str) -> list[list[str]]:
    return [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in output.splitlines()
        if line[:1] == "|"
    ]


def test_test_command_passes_every_backend_on_a_tiny_case(capsys):
    assert main(["test", "--filter", TINY]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert rows[0] == ["op", "case", "backend", "result", "worst", "max error", "allowed"]
    results = {(row[0], row[2]): row[3] for row in rows[2:]}
    tested = {name for name in backends.available() if name not in ("auto", "reference")}
    assert {backend for _, backend in results} == tested
    assert {op for op, _ in results} == set(check_backends.OPS)
    assert set(results.values()) <= {"pass", "unsupported", "unavailable"}
    assert "pass" in results.values()


def test_test_command_runs_ragged_and_biased_cases(capsys):
    """KV heads of different lengths (one holding only the chunk) with biased entries, by name."""
    assert main(["test", "--filter", "m0/17/260"]) == 0
    rows = table_rows(capsys.readouterr().out)[2:]
    assert rows and all(row[1].endswith("-ragged-bias") for row in rows)
    assert {row[3] for row in rows if row[2] == "sdpa"} == {"pass"}
    assert {row[3] for row in rows} <= {"pass", "unsupported", "unavailable"}


class ScaledBackend(backends.Backend):
    """The reference with outputs 1% too large: a backend the harness must fail."""

    name = "scaled"

    def __init__(self) -> None:
        self.reference = backends.get("reference")

    def supports(self, spec):
        return True

    def prefill(self, q, k, v, *, scale=None, window=None, out=None):
        result = self.reference.prefill(q, k, v, scale=scale, window=window)
        scaled = result.out * 1.01
        return backends.AttentionOutput(scaled if out is None else out.copy_(scaled), result.lse)


def test_test_command_fails_a_wrong_backend(capsys, monkeypatch):
    load = check_backends._load
    monkeypatch.setattr(
        check_backends, "_load", lambda name: ScaledBackend() if name == "scaled" else load(name)
    )
    assert main(["test", "--backend", "scaled", "--op", "prefill", "--filter", TINY]) == 1
    rows = table_rows(capsys.readouterr().out)
    assert rows[2][2:5] == ["scaled", "FAIL", "out"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["test", "--filter", "no such case"], "matches no case"),
        (["test", "--backend", "no-such-backend"], "unknown backend"),
        (["support", "--plugin", "no_such_plugin_module"], "not found"),
        (["perf", "--lengths", "4k"], "comma-separated integers"),
    ],
)
def test_bad_arguments_give_a_one_line_error(capsys, argv, message):
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1


def test_support_lists_every_backend_and_refuses_odd_head_dims(capsys):
    assert main(["support"]) == 0
    rows = table_rows(capsys.readouterr().out)
    header = rows[0]
    assert header[:5] == ["device", "dtype", "head dim", "window", "stats"]
    assert set(header[5:]) == {name for name in backends.available() if name != "auto"}
    reference = header.index("reference")
    assert all(row[reference] == "yes" for row in rows[2:])
    if "triton" in header:
        triton = header.index("triton")
        odd = [row for row in rows[2:] if row[2] == "80"]
        assert odd and all(row[triton] in ("no", "unavailable") for row in odd)
        try:
            expected = "interpreted" if backends.get("triton").interpreted else "no"
        except ImportError:
            expected = "unavailable"
        assert {row[triton] for row in rows[2:] if row[0] == "cpu" and row[2] == "64"} == {expected}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU timing path")
def test_perf_times_each_backend_and_eager_attention_on_the_cpu(capsys, tmp_path):
    report = tmp_path / "perf.json"
    argv = ["perf", "--lengths", "48", "--chunk", "16", "--heads", "4", "--kv-heads", "2", "--head-dim", "16"]
    assert main([*argv, "--repeats", "1", "--last", "8", "--json", str(report)]) == 0
    rows = json.loads(report.read_text())["rows"]
    measured = {(row["backend"], row["op"]) for row in rows}
    assert {("reference", "prefill"), ("sdpa", "scores_last"), ("eager", "prefill")} <= measured
    assert all(row["ms"] > 0 for row in rows)
    scores = next(row for row in rows if row["backend"] == "reference" and row["op"] == "scores")
    assert scores["scores/forward"] > 0
    assert "| op" in capsys.readouterr().out
