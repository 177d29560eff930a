"""A policy from the user's own module: the README's example, run exactly as written, through the CLI."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import write_tiny_checkpoint

REPO = Path(__file__).resolve().parents[2]


def readme_example() -> str:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    match = re.search(r"<!-- example: my_policy.py -->\s*```python\n(.*?)```", readme, re.DOTALL)
    assert match, "README.md lost its policy example"
    return match.group(1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("plugin")
    (root / "my_policy.py").write_text(readme_example())
    document = root / "doc.txt"
    document.write_text("Long context inference keeps a bounded memory of keys and values. " * 40)
    return root, write_tiny_checkpoint(root / "ckpt"), document


def run_chat(root, checkpoint, document, *extra):
    argv = ["-m", str(checkpoint), "-f", str(document), "-p", "summary?", "-n", "3", "--stats"]
    argv += ["--policy", "recent_heavy", "--schedule", "imdc", "--memory", "24", "--chunk", "32", *extra]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(REPO)])}
    return subprocess.run(
        [sys.executable, "-m", "engine.chat", *argv], capture_output=True, text=True, env=env, timeout=300
    )


def kept_per_step(stderr: str) -> list[int]:
    rows = [line.split() for line in stderr.split("peak MiB")[1].splitlines()]
    return [int(row[2]) for row in rows if row and row[0].isdigit()]


def test_readme_policy_runs_through_the_cli_with_plugin(setup):
    result = run_chat(*setup, "--plugin", "my_policy")
    assert result.returncode == 0, result.stderr
    *document, question = kept_per_step(result.stderr)
    assert len(document) > 3 and max(document) <= 24
    assert question <= 24 + 32  # the question is appended without eviction within M + c


def test_unknown_policy_without_the_plugin_names_the_fix(setup):
    result = run_chat(*setup)
    assert result.returncode == 2
    assert "unknown policy 'recent_heavy'" in result.stderr and "--plugin" in result.stderr


def test_entry_point_group_registers_without_plugin_flag(setup):
    root = setup[0]
    info = root / "my_policy-0.1.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-policy\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[engine.policies]\nrecent_heavy = my_policy\n")
    result = run_chat(*setup)
    assert result.returncode == 0, result.stderr
    assert max(kept_per_step(result.stderr)[:-1]) <= 24
