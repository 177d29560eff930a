"""Every command line of the project, given wrong arguments, answers with one line: what was wrong and
what to do, no traceback, a non-zero exit."""

from __future__ import annotations

import importlib

import pytest

COMMANDS = {
    "engine.chat": [
        ["--temp", "nan"],
        ["--no-such-flag"],
        ["-n", "many"],
        ["--device", "gpu", "-p", "hi"],
        ["-m", "/no/such/checkpoint", "-p", "hi"],
        ["--pod-arg", "threshold=0.7", "-p", "hi"],
        ["--pod", "--policy", "snapkv", "-p", "hi"],
        ["--pod", "--pod-arg", "threshold=7", "-p", "hi"],
    ],
    "tools.convert_gguf": [[], ["/no/such/model.gguf", "/tmp/out"]],
    "tools.check_backends": [["frobnicate"], ["test", "--backend", "nope"], ["perf", "--lengths", "x"]],
    "tools.bench_prefill": [["--length", "-5"], ["--schedules", "weekly"], ["--memory", "a,b"]],
    "tools.bench_generate": [["--lengths", "x"], ["--configs", "imdc:nope:256"]],
    "tools.eval_passkey": [
        ["--keys", "0"],
        ["--depths", "2"],
        ["--configs", "full:snapkv"],
        ["--configs", "reform:imdc:h2o:256"],
    ],
    "tools.eval_ppl": [["--configs", "imdc"], ["--samples", "x"]],
    "tools.eval_longctx": [
        ["--tasks", "qa9"],
        ["--lengths", "many"],
        ["--turns", "0"],
        ["--plugin", "no_such_mod"],
        ["--configs", "full:pod=0.5:pod_window=3"],
        ["--configs", "imdc:snapkv:256:pod=0.5"],
    ],
    "tools.results": [["--docs", "/no/such/folder"]],
    "tools.find_heads": [["--samples", "0"], ["--length", "many"]],
    "engine.serve": [["--port", "99999"], ["--memory", "64"], ["--queue", "x"]],
    "tools.bench_serve": [["--clients", "0"], ["--config", "imdc:nope:256"]],
    "tools.bench_reform": [["--lengths", "x"], ["--policy", "nope"]],
}
CASES = [(module, argv) for module, argvs in COMMANDS.items() for argv in argvs]


@pytest.mark.parametrize(("module", "argv"), CASES, ids=[f"{m}:{' '.join(a)}" for m, a in CASES])
def test_wrong_arguments_get_one_line(module, argv, capsys):
    main = importlib.import_module(module).main
    try:
        status = main(argv)
    except SystemExit as exit:  # argparse's own errors
        status = exit.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("loading ")]
    assert status not in (0, None), err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "error" in lines[0]
