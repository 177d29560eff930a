"""Calibrate a model's heads once, offline, into its calibration file (``engine.calibration``).

    python -m tools.find_heads -m path/to/checkpoint            # writes path/to/checkpoint/calibration.json
    python -m tools.find_heads --output models/calibration/SmolLM2-135M-Instruct.json
    python -m tools.find_heads -m CKPT --methods razor,duo      # remake some sections, keep the others

One section per method, each measured as its paper does (see ``tools/calibrate/``): ``reform``
(REFORM's embedding heads, by mean normalised rank on pattern-matching and multi-hop prompts),
``razor`` (RazorAttention's echo and induction scores on repeated random tokens), ``duo``
(DuoAttention's training-free proxy, kvpress's), ``compresskv`` (CompressKV's semantic retrieval heads
on needle prompts, and each layer's error under compression), ``pod`` (how alike layers attend to
distant tokens, per KV head: POD's layer blocks). Nothing is calibrated at chat time.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from tqdm import tqdm

from engine.calibration import CHECKPOINT_FILE, FORMAT, identity
from engine.cli import run_main
from engine.config import read_json_object
from tools.calibrate import compresskv, duo, pod, razor, reform
from tools.report import ToolError, tool_parser
from tools.shapes import add_model_options, load_from_args

TOOL = "find_heads"
METHODS = {module.NAME: module for module in (reform, razor, duo, compresskv, pod)}


def parser() -> argparse.ArgumentParser:
    p = tool_parser(TOOL, __doc__)
    p.add_argument(
        "--methods", default=",".join(METHODS),
        help=f"sections to measure, comma-separated (default: all of {', '.join(METHODS)})",
    )  # fmt: skip
    p.add_argument(
        "--length", type=int, default=4096, help="tokens per calibration prompt (default: %(default)s)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts (default: %(default)s)")
    for module in METHODS.values():
        module.add_options(p)
    p.add_argument("--output", help=f"file to write (default: the checkpoint's {CHECKPOINT_FILE})")
    add_model_options(p, shapes=False)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run_main(lambda: _run(args, argv), debug=args.debug)


def _run(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    methods = [name.strip() for name in args.methods.split(",") if name.strip()]
    unknown = [name for name in methods if name not in METHODS]
    if unknown or not methods:
        given = ", ".join(unknown) or "(none)"
        raise ToolError(f"unknown --methods {given}; choose from {', '.join(METHODS)}")
    counts = {name: value for name, value in vars(args).items() if name.endswith(("samples", "per_task"))}
    if any(value < 1 for value in counts.values()) or args.length < 256:
        raise ToolError("sample counts and --per-task must be at least 1, --length at least 256 tokens")
    if args.razor_length is not None and args.razor_length < 2:
        raise ToolError("--razor-length must be at least 2 tokens")
    for name in methods:
        getattr(METHODS[name], "check", lambda args: None)(args)
    llm = load_from_args(args)
    if llm.tokenizer is None:
        raise ToolError("calibration prompts need a checkpoint with a tokenizer (--model DIR)")
    output = Path(args.output) if args.output else Path(llm.path) / CHECKPOINT_FILE
    data = read_json_object(output, ToolError) or {}
    if data.get("model", {}).get("fingerprint") not in (None, identity(llm)["fingerprint"]):
        data = {}  # another model's file: nothing of it is kept
    command = " ".join(["python -m tools.find_heads", *(sys.argv[1:] if argv is None else argv)])
    date = datetime.now().astimezone().isoformat(timespec="seconds")
    total = sum(METHODS[name].units(args) for name in methods)
    with tqdm(total=total, desc=TOOL, unit="step") as bar:
        for name in methods:
            bar.set_postfix(method=name)
            section = METHODS[name].calibrate(llm, args, lambda: bar.update(1))
            data[name] = {**section, "command": command, "date": date}
    data.update({"format": FORMAT, "model": identity(llm)})
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    for name in methods:
        print(METHODS[name].summary(data[name]))
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
