"""Imports flow one way: shared contracts at the bottom, then models/backends/schedules/policies,
then the engine, then the tools. A test fails on any import that goes up."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The shared contracts: the registry, the model config, one-line notes, the format of quantized KV
# entries (the memory writes it, kernels and policies read it). They import nothing above them.
BOTTOM = {"engine.registry", "engine.config", "engine.notices", "engine.kv_quant"}
MIDDLE = {"models", "backends", "schedules", "policies"}
PACKAGES = {*MIDDLE, "engine", "tools"}


def layer(module: str) -> int:
    if module in BOTTOM:
        return 0
    top = module.split(".")[0]
    if top in MIDDLE:
        return 1
    return 2 if top == "engine" else 3


def project_imports(path: Path) -> set[str]:
    """Every project module ``path`` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        found |= {name for name in names if name.split(".")[0] in PACKAGES and _is_module(name)}
    return found


def _is_module(name: str) -> bool:
    path = REPO.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def test_no_import_goes_up_a_layer():
    upward = []
    for package in sorted(PACKAGES):
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            for imported in project_imports(path):
                if layer(imported) > layer(module):
                    upward.append(
                        f"{module} (layer {layer(module)}) imports {imported} (layer {layer(imported)})"
                    )
    assert not upward, "\n".join(upward)


def test_importing_the_packages_changes_nothing_but_their_registries():
    code = (
        "import os, sys\n"
        "before = dict(os.environ)\n"
        "import models, backends, schedules, policies\n"
        "assert dict(os.environ) == before, set(os.environ.items()) ^ set(before.items())\n"
        "upper = sorted(m for m in sys.modules if m.startswith(('engine.', 'tools')) and m not in "
        f"{sorted(BOTTOM)!r})\n"
        "assert not upper, upper\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
