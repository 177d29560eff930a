"""python -m engine.chat: one-shot answers, the interactive loop, Ctrl-C, long documents and bad input."""

import os
import select
import signal
import subprocess
import sys
import time

import pytest
from tiny import write_tiny_checkpoint

from engine.chat import main

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("chat") / "ckpt")


def chat(*argv, stdin=None, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "engine.chat", *argv],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def test_default_model_answers_paris(capsys):
    assert main(["-p", "What is the capital of France?", "-n", "24", "--temp", "0"]) == 0
    assert "Paris" in capsys.readouterr().out


def test_interactive_commands(tiny):
    result = chat("-m", str(tiny), "-n", "5", "--temp", "0", stdin="hello\n/stats\n/reset\nagain\n/exit\n")
    assert result.returncode == 0, result.stderr
    assert "commands: /help, /reset, /stats, /exit" in result.stderr
    assert "step  chunk  memory  seconds  peak MiB" in result.stderr
    assert "conversation reset" in result.stderr
    assert result.stdout.count("> ") == 5  # one prompt per line of input


def test_end_of_input_exits_cleanly(tiny):
    result = chat("-m", str(tiny), "-n", "3", stdin="hello\n")
    assert result.returncode == 0, result.stderr


def start_interactive(tiny):
    return subprocess.Popen(
        [sys.executable, "-m", "engine.chat", "-m", str(tiny), "--ignore-eos", "--temp", "0"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        # As from a terminal: a test run started in the background inherits SIGINT ignored, and a
        # Python started with SIGINT ignored never raises KeyboardInterrupt.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def read_until(process, predicate, timeout=120):
    """Read the process's stdout until ``predicate(everything so far)`` holds."""
    seen = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], 0.1)
        if ready:
            seen += os.read(process.stdout.fileno(), 65536)
            if predicate(seen.decode(errors="replace")):
                return seen
    process.kill()
    raise AssertionError(f"timed out; output so far: {seen!r}")


def press_ctrl_c_until_exit(process, timeout=60):
    """Ctrl-C, pressed again each second until the process exits, as a person would. A press that
    lands after the prompt is written but before input() starts reading is only noted by CPython;
    the next press interrupts the read. Test processes are fast enough to hit that window."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        process.send_signal(signal.SIGINT)
        try:
            return process.wait(timeout=1)
        except subprocess.TimeoutExpired:
            continue
    process.kill()
    raise AssertionError("Ctrl-C did not end the chat")


def test_ctrl_c_stops_the_answer_and_keeps_the_session(tiny):
    process = start_interactive(tiny)
    process.stdin.write("tell me everything\n")
    process.stdin.flush()
    read_until(process, lambda out: len(out.split("> ", 1)[-1]) > 20)  # the endless answer is streaming
    process.send_signal(signal.SIGINT)
    read_until(process, lambda out: "[stopped]" in out and out.rstrip().endswith(">"))
    process.stdin.write("/exit\n")
    process.stdin.flush()
    assert process.wait(timeout=60) == 0


def test_second_ctrl_c_exits(tiny):
    process = start_interactive(tiny)
    process.stdin.write("tell me everything\n")
    process.stdin.flush()
    read_until(process, lambda out: len(out.split("> ", 1)[-1]) > 20)
    process.send_signal(signal.SIGINT)
    time.sleep(0.5)  # unhandled signals coalesce: a person's second press comes later
    assert press_ctrl_c_until_exit(process) in (0, 130)
    assert "Traceback" not in process.stderr.read()


def test_ctrl_c_at_the_prompt_exits_cleanly(tiny):
    process = start_interactive(tiny)
    read_until(process, lambda out: out.rstrip().endswith(">"))
    assert press_ctrl_c_until_exit(process) == 0
    assert "Traceback" not in process.stderr.read()


def test_long_document_is_prefilled_by_the_schedule_and_the_conversation_continues(tiny, tmp_path):
    document = tmp_path / "doc.txt"
    document.write_text("Long context inference keeps a bounded memory of keys and values. " * 120)
    argv = ["-m", str(tiny), "-f", str(document), "-n", "4", "--temp", "0", "--stats"]
    argv += ["--schedule", "imdc", "--policy", "snapkv", "--memory", "64", "--chunk", "64"]
    result = chat(*argv, stdin="first question\nsecond question\n/exit\n")
    assert result.returncode == 0, result.stderr
    assert "read " in result.stderr and "doc.txt" in result.stderr
    tables = result.stderr.split("step  chunk  memory  seconds  peak MiB")
    assert len(tables) == 3  # one per answer
    for table in tables[1:]:
        rows = [line.split() for line in table.strip().splitlines()]
        memories = [int(row[2]) for row in rows if row and row[0].isdigit()]
        # The questions and answers are appended without eviction while within M + c.
        assert memories and max(memories) <= 64 + 64


def test_document_beyond_the_window_with_full_attention_gets_a_hint(tiny, tmp_path):
    document = tmp_path / "doc.txt"
    document.write_text("Long context inference keeps a bounded memory. " * 120)
    result = chat("-m", str(tiny), "-f", str(document), "-p", "summary?", "-n", "2")
    assert "more than the model's 512-token window; try --schedule imdc" in result.stderr


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--policy", "oracle"], "error: unknown policy 'oracle'; known: attn_mean, h2o"),
        (["--schedule", "weekly"], "error: unknown schedule 'weekly'; known: fixed, full, im, imdc"),
        (["--chunk", "0"], "error: chunk must be a positive number of tokens, got 0"),
        (["--memory", "-4"], "error: memory must be a non-negative number of tokens, got -4"),
        (["--positions", "absolute"], "error: positions must be one of compact, original"),
        (
            ["--policy", "snapkv", "--policy-arg", "window"],
            "error: --policy-arg takes KEY=VALUE, got 'window'",
        ),
        (["--policy", "snapkv", "--policy-arg", "windw=3"], "error: policy 'snapkv' has no option windw"),
        (["--plugin", "no_such_module_xyz"], "error: plugin module 'no_such_module_xyz' not found"),
        (["--backend", "cuda-magic"], "error: unknown backend 'cuda-magic'; known: auto"),
        (["--dtype", "float8"], "error: unknown dtype 'float8'"),
        (["-f", "/nonexistent/doc.txt"], "No such file or directory"),
        (["--chat-template-file", "/nonexistent/t.jinja"], "No such file or directory"),
    ],
)
def test_bad_input_is_one_clear_line(tiny, capsys, argv, message):
    assert main(["-m", str(tiny), "-p", "hi", "-n", "1", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bad_checkpoints_are_one_clear_line(tmp_path, capsys):
    assert main(["-m", str(tmp_path / "missing"), "-p", "hi"]) == 2
    assert "checkpoint directory" in capsys.readouterr().err
    (tmp_path / "config.json").write_text('{"architectures": ["BertModel"]}')
    assert main(["-m", str(tmp_path), "-p", "hi"]) == 2
    assert "unsupported architecture BertModel" in capsys.readouterr().err


def test_broken_chat_template_is_one_clear_line(tiny, tmp_path, capsys):
    template = tmp_path / "t.jinja"
    template.write_text("{{ raise_exception('roles must alternate') }}")
    assert main(["-m", str(tiny), "-p", "hi", "--chat-template-file", str(template)]) == 2
    assert "roles must alternate" in capsys.readouterr().err


def test_query_aware_reads_the_document_with_the_question(tiny, tmp_path):
    document = tmp_path / "doc.txt"
    document.write_text("Long context inference keeps a bounded memory of keys and values. " * 60)
    argv = [
        "-m",
        str(tiny),
        "-f",
        str(document),
        "-p",
        "what is kept?",
        "-n",
        "3",
        "--stats",
        "--query-aware",
    ]
    result = chat(*argv, "--schedule", "fixed", "--policy", "snapkv", "--memory", "48", "--chunk", "64")
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stderr.split("peak MiB")[1].splitlines()]
    steps = [row for row in rows if row and row[0].isdigit()]
    assert len(steps) > 5 and all(int(row[2]) <= 48 for row in steps)
