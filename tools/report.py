"""What every benchmark and evaluation tool writes: machine facts, markdown tables, JSON and plots.

A tool builds one report dictionary (``start_report``), fills in its raw numbers, and hands it to
``publish`` with a function that turns the report into tables. The same function later renders the
report's JSON into ``docs/RESULTS.md`` (``tools.results``), so a table is defined exactly once.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from engine.cli import Parser
from engine.peak_memory import proc_field

GIB = 2**30
MIB = 2**20


class ToolError(ValueError):
    """A command-line value a tool cannot use; the message says what to give instead."""


@dataclass(frozen=True)
class Table:
    title: str
    header: Sequence[str]
    rows: Sequence[Sequence[object]]
    notes: Sequence[str] = field(default_factory=tuple)

    def markdown(self) -> str:
        cells = [[str(c) for c in self.header], *[[fmt(c) for c in row] for row in self.rows]]
        widths = [max(len(row[i]) for row in cells) for i in range(len(self.header))]
        lines = [cells[0], ["-" * width for width in widths], *cells[1:]]
        body = "\n".join(
            "| " + " | ".join(f"{c:{w}}" for c, w in zip(line, widths, strict=True)) + " |" for line in lines
        )
        notes = "".join(f"\n\n{note}" for note in self.notes)
        return f"**{self.title}**\n\n{body}{notes}"


def fmt(value: object) -> str:
    """A table cell: floats to 3 significant digits (whole numbers from 1000 up), None as "-"."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.3g}"
    return str(value)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None when either is missing (a run that did not fit, or not run)."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def machine_info(device: torch.device | str) -> dict[str, Any]:
    """The facts a reader needs to judge a timing: CPU, cores, memory, library versions, GPU."""
    device = torch.device(device)
    memory = proc_field("/proc/meminfo", "MemTotal")
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": memory / GIB if memory else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def start_report(
    tool: str, argv: Sequence[str] | None, device: torch.device | str, settings: dict[str, Any]
) -> dict[str, Any]:
    """A new report: the tool's name, the exact command, when and where it ran, and its settings."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return {
        "tool": tool,
        "command": shlex.join(["python", "-m", f"tools.{tool}", *argv]),
        "argv": argv,
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_info(device),
        "settings": settings,
        "notes": [],
        "plot": None,
    }


def describe_machine(machine: dict[str, Any]) -> str:
    parts = [f"{machine['cpu']}, {machine['cores']} cores"]
    if machine.get("memory_gib"):
        parts.append(f"{machine['memory_gib']:.0f} GiB RAM")
    if machine.get("gpu"):
        parts.append(f"GPU {machine['gpu']}")
    parts.append(f"torch {machine['torch']}")
    if machine.get("triton"):
        parts.append(f"triton {machine['triton']}")
    parts.append(f"device {machine['device']}")
    return ", ".join(parts)


def render(report: dict[str, Any], tables: Sequence[Table]) -> str:
    """The report as markdown: where and how it was measured, its notes, then its tables."""
    lines = [
        f"- machine: {describe_machine(report['machine'])}",
        f"- date: {report['date']}",
        f"- command: `{report['command']}`",
    ]
    notes = [f"- note: {note}" for note in report["notes"]]
    return "\n".join([*lines, *notes]) + "".join(f"\n\n{table.markdown()}" for table in tables)


def tool_parser(tool: str, doc: str) -> argparse.ArgumentParser:
    """The parser of ``python -m tools.<tool>``, whose help shows the module's documentation as written."""
    return Parser(
        prog=f"python -m tools.{tool}", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def add_output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", metavar="PATH", help="write every raw number and the machine facts here")
    parser.add_argument("--plot", metavar="PATH", help="draw the results into this PNG (needs matplotlib)")


def publish(
    report: dict[str, Any],
    tables: Callable[[dict[str, Any]], list[Table]],
    *,
    json_path: str | None,
    plot_path: str | None,
    draw: Callable[[Any, dict[str, Any]], Any],
) -> None:
    """Draw the plot (``draw(pyplot, report)`` returns a figure), print the tables, write the JSON."""
    if plot_path:
        pyplot = _pyplot()
        if pyplot is None:
            report["notes"].append("no plot: matplotlib is not installed (pip install -e '.[bench]')")
        else:
            figure = draw(pyplot, report)
            Path(plot_path).parent.mkdir(parents=True, exist_ok=True)
            figure.savefig(plot_path, dpi=120, bbox_inches="tight")
            pyplot.close(figure)
            report["plot"] = Path(plot_path).name
    print(f"# {report['tool']}\n\n{render(report, tables(report))}")
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot

    return matplotlib.pyplot


def parse_list(text: str, kind: Callable[[str], Any], flag: str) -> list[Any]:
    """A comma-separated option value as a list of ``kind`` (int, float, str)."""
    try:
        values = [kind(part.strip()) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ToolError(f"{flag} takes comma-separated {kind.__name__} values, got {text!r}") from None
    if not values:
        raise ToolError(f"{flag} needs at least one value")
    return values
