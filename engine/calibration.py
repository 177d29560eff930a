"""Per-model calibration: offline facts about a model's heads, one small JSON file per model.

``python -m tools.find_heads`` measures them (REFORM's embedding heads today) and writes
``calibration.json`` into the checkpoint directory; files for models that ship with the engine sit
in ``models/calibration/``. A file names the model it was made for (shape and a weight fingerprint),
and a file for another model, or none at all, is refused with the command that makes the right one.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from engine.config import read_json_object

FORMAT = 1
CHECKPOINT_FILE = "calibration.json"
SHIPPED = Path(__file__).resolve().parent.parent / "models" / "calibration"
FINGERPRINT_VALUES = 4096


class CalibrationError(ValueError):
    """A calibration file is missing, unreadable, or made for another model."""


def identity(llm: Any) -> dict[str, Any]:
    """What a calibration file records of its model: the shape, and a fingerprint of the weights."""
    c = llm.config
    return {
        "name": llm.path.name,
        "layers": c.num_layers,
        "heads": c.num_heads,
        "kv_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "hidden": c.hidden_size,
        "vocab": c.vocab_size,
        "fingerprint": fingerprint(llm.model),
    }


def fingerprint(model: torch.nn.Module) -> str:
    """The signs of the embedding table's first values: they tell two checkpoints of one shape apart
    and survive storing the weights as float16 or bfloat16."""
    values = model.model.embed_tokens.weight.detach().flatten()[:FINGERPRINT_VALUES]
    signs = (values > 0).to(torch.uint8).cpu().numpy().tobytes()
    return hashlib.sha256(signs).hexdigest()[:16]


def make_command(llm: Any) -> str:
    return f"python -m tools.find_heads -m {llm.path}"


def find(llm: Any, path: str | Path | None = None) -> tuple[dict[str, Any], Path]:
    """The calibration of ``llm``: ``path`` when given, else the checkpoint's own file, else a shipped
    file made for this model."""
    mine = identity(llm)
    if path is not None:
        data = _read(Path(path), llm)
        _check(data, mine, Path(path), llm)
        return data, Path(path)
    own = Path(llm.path) / CHECKPOINT_FILE
    if own.is_file():
        data = _read(own, llm)
        _check(data, mine, own, llm)
        return data, own
    for shipped in sorted(SHIPPED.glob("*.json")):
        data = _read(shipped, llm)
        if data.get("model", {}).get("fingerprint") == mine["fingerprint"]:
            _check(data, mine, shipped, llm)
            return data, shipped
    raise CalibrationError(
        f"no head calibration for {mine['name']}: run `{make_command(llm)}` (it writes {own}), "
        "or give a calibration file"
    )


def section(data: dict[str, Any], name: str, path: Path, llm: Any) -> dict[str, Any]:
    """One method's part of a calibration file."""
    part = data.get(name)
    if not isinstance(part, dict):
        raise CalibrationError(f"{path} has no '{name}' calibration: run `{make_command(llm)}` to remake it")
    return part


def _read(path: Path, llm: Any) -> dict[str, Any]:
    remedy = f"remake it with `{make_command(llm)}`"
    data = read_json_object(path, CalibrationError, remedy)
    if data is None:
        raise CalibrationError(f"calibration file {path} not found; make it with `{make_command(llm)}`")
    if data.get("format") != FORMAT or not isinstance(data.get("model"), dict):
        raise CalibrationError(f"{path} is not a calibration file of format {FORMAT}; {remedy}")
    return data


def _check(data: dict[str, Any], mine: dict[str, Any], path: Path, llm: Any) -> None:
    theirs = data["model"]
    different = [key for key in mine if key != "name" and theirs.get(key) != mine[key]]
    if different:
        shown = ", ".join(f"{key} {theirs.get(key)} (this model: {mine[key]})" for key in different)
        raise CalibrationError(
            f"{path} was made for another model ({theirs.get('name')}: {shown}); run `{make_command(llm)}`"
        )
