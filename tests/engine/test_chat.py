"""python -m engine.chat: one-shot answers, the interactive loop, Ctrl-C, long documents and bad input."""

import os
import select
import signal
import subprocess
import sys
import time

import pytest
import torch
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
        (["--policy", "oracle"], "error: unknown policy 'oracle'; known: adakv, attn_mean, compresskv"),
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


def test_help_lists_the_commands_and_unknown_commands_are_not_questions(tiny):
    stdin = "/help\n/frobnicate now\n//etc is a folder\n/exit\n"
    result = chat("-m", str(tiny), "-n", "2", "--temp", "0", stdin=stdin)
    assert result.returncode == 0, result.stderr
    for command in ("/help", "/reset", "/stats", "/exit"):
        assert f"\n{command} " in result.stderr
    assert "unknown command /frobnicate, see /help" in result.stderr
    assert result.stdout.count("> ") == 4  # the //-escaped line was answered as a message: "/etc is ..."


def test_a_policy_without_a_schedule_compresses_with_imdc(tiny, tmp_path):
    document = tmp_path / "doc.txt"
    document.write_text("Long context inference keeps a bounded memory of keys and values. " * 60)
    argv = ["-m", str(tiny), "-f", str(document), "-p", "what?", "-n", "2", "--stats"]
    result = chat(*argv, "--policy", "snapkv", "--memory", "48", "--chunk", "64")
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stderr.split("peak MiB")[1].splitlines()]
    memories = [int(row[2]) for row in rows if row and row[0].isdigit()]
    assert len(memories) > 5 and max(memories[:-1]) <= 48  # imdc's document steps, then the question


def test_read_counts_the_documents_own_tokens(tiny, tmp_path):
    from engine.tokenizer import load_tokenizer

    text = "Long context inference keeps a bounded memory of keys and values. " * 30
    document = tmp_path / "doc.txt"
    document.write_text(text)
    result = chat("-m", str(tiny), "-f", str(document), "-n", "1", stdin="/exit\n")
    tokens = len(load_tokenizer(tiny).encode(text, add_special=False))
    assert f"read {tokens} tokens of {document}" in result.stderr


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--memory", "64"], "--memory 64 sets a compression budget, but no --policy chooses which tokens"),
        (["--chunk", "64"], "--chunk 64 splits the prompt only with a chunked --schedule"),
        (
            ["--schedule", "full", "--policy", "snapkv"],
            "schedule 'full' keeps every token, so policy 'snapkv'",
        ),
        (["--temp", "nan"], "temperature must be a finite number, got nan"),
        (["--device", "gpu"], "unknown device 'gpu'; use cpu or cuda"),
        (["--plugin", "./no_such_policy.py"], "plugin file ./no_such_policy.py not found"),
    ],
)
def test_more_bad_input_is_one_clear_line(tiny, capsys, argv, message):
    assert main(["-m", str(tiny), "-p", "hi", "-n", "1", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_cuda_without_a_gpu_is_one_clear_line(tiny, capsys):
    assert main(["-m", str(tiny), "-p", "hi", "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: device 'cuda': ") and err[-1].endswith("use --device cpu")


def test_a_broken_gguf_file_is_one_clear_line(tmp_path, capsys):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    assert main(["-m", str(gguf), "-p", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: cannot read {gguf} as a GGUF file") and "Traceback" not in "".join(err)


def test_plugins_load_from_a_file_and_name_a_missing_dependency(tiny, tmp_path, capsys):
    policy = tmp_path / "file_policy.py"
    policy.write_text(
        "import policies\n\n@policies.register('from_a_file')\nclass FromAFile(policies.Policy):\n"
        "    def score(self, candidates):\n        return candidates.positions.float()\n"
    )
    argv = [
        "-m",
        str(tiny),
        "-p",
        "hi",
        "-n",
        "1",
        "--policy",
        "from_a_file",
        "--memory",
        "8",
        "--chunk",
        "8",
    ]
    assert main([*argv, "--plugin", str(policy)]) == 0
    broken = tmp_path / "needs_numpyx.py"
    broken.write_text("import numpyx_is_not_installed\n")
    assert main(["-m", str(tiny), "-p", "hi", "--plugin", str(broken)]) == 2
    assert "needs the module 'numpyx_is_not_installed', which is not installed" in capsys.readouterr().err


def test_a_document_too_large_for_free_memory_is_refused(tiny, tmp_path, capsys, monkeypatch):
    from engine import peak_memory

    document = tmp_path / "doc.txt"
    document.write_text("Long context inference keeps a bounded memory of keys and values. " * 60)
    monkeypatch.setattr(peak_memory, "available_bytes", lambda device: 50_000)
    assert main(["-m", str(tiny), "-f", str(document), "-p", "hi"]) == 2
    err = capsys.readouterr().err
    assert "with schedule full needs about" in err and "--schedule imdc --policy snapkv" in err


def start_reading(tiny, document):
    """An interactive chat reading a document slowly: small chunks and the reference backend."""
    argv = ["-m", str(tiny), "-f", str(document), "--temp", "0", "-n", "3", "--backend", "reference"]
    argv += ["--schedule", "fixed", "--policy", "h2o", "--memory", "32", "--chunk", "16"]
    return subprocess.Popen(
        [sys.executable, "-m", "engine.chat", *argv],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


@pytest.fixture()
def slow_document(tmp_path):
    document = tmp_path / "long.txt"
    document.write_text("Long context inference keeps a bounded memory of keys and values. " * 4000)
    return document


def wait_for_reading(process, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stderr], [], [], 0.1)
        if ready and "prefill" in os.read(process.stderr.fileno(), 65536).decode(errors="replace"):
            return
    process.kill()
    raise AssertionError("the progress bar never showed")


def test_ctrl_c_stops_reading_and_the_chat_goes_on(tiny, slow_document):
    process = start_reading(tiny, slow_document)
    wait_for_reading(process)
    started = time.monotonic()
    process.send_signal(signal.SIGINT)
    out, err = process.communicate("/help\n/exit\n", timeout=120)
    assert process.returncode == 0, err
    assert "it will be read with your first message" in err and "Traceback" not in err
    assert out.count("> ") == 2  # the chat went on: a prompt for each line
    assert time.monotonic() - started < 60


def test_second_ctrl_c_while_reading_exits_with_130(tiny, slow_document):
    process = start_reading(tiny, slow_document)
    wait_for_reading(process)
    process.send_signal(signal.SIGINT)
    time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode in (0, 130) and "Traceback" not in err


def test_the_docs_say_what_the_commands_do():
    from pathlib import Path

    from engine.checkpoint import load_model
    from engine.llm import load
    from engine.options import FLOAT16_SPEEDUP, PLUGIN_HELP

    readme = (Path(REPO) / "README.md").read_text(encoding="utf-8")
    figure = FLOAT16_SPEEDUP.split(",")[0]  # "1.5-2.7x faster CPU decode"
    docs = [" ".join(function.__doc__.split()) for function in (load, load_model)]
    assert FLOAT16_SPEEDUP in readme and all(figure in doc for doc in docs)
    assert f"| `--plugin MODULE` | {PLUGIN_HELP} |" in readme
    assert "default: `imdc` when `--policy` is given, else `full`" in readme
    assert "--predict` (a negative number, the default, generates until the end-of-sequence token)" in readme


def test_reform_reads_the_document_and_shows_both_phases(tmp_path):
    import json

    import engine
    from engine import calibration

    checkpoint = write_tiny_checkpoint(tmp_path / "ckpt", num_hidden_layers=3)
    model = engine.load(checkpoint, backend="reference")
    heads = {"heads": [[1, "k", 0], [0, "q", 2]]}
    data = {"format": calibration.FORMAT, "model": calibration.identity(model), "reform": heads}
    (checkpoint / calibration.CHECKPOINT_FILE).write_text(json.dumps(data))
    document = tmp_path / "doc.txt"
    document.write_text("Long context inference keeps a bounded memory of keys and values. " * 60)
    argv = ["-m", str(checkpoint), "-f", str(document), "-n", "2", "--temp", "0", "--stats", "--reform"]
    argv += ["--memory", "32", "--chunk", "64", "--reform-arg", "reserve=64", "--reform-arg", "prefix=16"]
    result = chat(*argv, "--reform-arg", "suffix=16", stdin="what is kept?\nand then?\n/exit\n")
    assert result.returncode == 0, result.stderr
    assert result.stderr.count(f"tokens of {document}") == 1  # the document is read once, up front...
    assert result.stderr.count("REFORM phase 1: read before with 2 of 3 layers") == 2
    assert result.stderr.count("REFORM phase 2: gathered 448 of ") == 2  # ...and gathered for each question
    bad = chat("-m", str(checkpoint), "-p", "hi", "--reform-arg", "gather=10")
    assert bad.returncode == 2 and "--reform-arg sets REFORM's options: add --reform" in bad.stderr
    bad = chat(
        "-m", str(checkpoint), "-f", str(document), "-p", "hi", "--reform", "--reform-arg", "gatherr=10"
    )
    assert bad.returncode == 2 and "REFORM has no option gatherr; options: gather, pool" in bad.stderr
