"""Long-context evaluation: RULER- and BABILong-style tasks, every prefill config on the same cases.

    python -m tools.eval_longctx --tasks core --lengths 2048,4096,8192,16384 --samples 3 \\
        --configs full,imdc:snapkv:1024,imdc:h2o:1024 --json docs/longctx.json --plot docs/longctx.png

Each case is a document (an instruction and a haystack hiding the facts) and its questions. As
kvpress evaluates, the document is read and compressed first, without the question (unless
``--query-aware``), and the question then follows as the next tokens of the same conversation;
answers are greedy. With ``--turns N`` one document carries N independent needles or facts and the N
questions are asked one after another over the same memory (``engine.ChatSession``). A score is the
fraction of the expected strings found in the answer (RULER's measure); a cell is the mean over
samples. ``full`` is not run past the model's window unless ``--full-beyond-window`` (it only fails
there). Prefill seconds, peak memory and the bytes of the memory kept sit beside the accuracy.

A run writes its JSON after every case: the same command with the same ``--json`` continues a
stopped run where it stopped, so a grid too long for one sitting can be run in several. Cases run
shortest first, every config on a case before the next case, so a stopped run has compared every
config on the same cases.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from engine.cli import run_main
from engine.generate import GREEDY
from engine.llm import LLM
from engine.session import ChatSession
from tools.longctx import PRESETS, TASKS, Case, expand_tasks, make_case, score
from tools.longctx.haystack import SOURCES
from tools.measure import Stopwatch
from tools.prefill_specs import FULL, NamedConfig, add_config_options, configs_from_args
from tools.report import (
    GIB,
    MIB,
    Table,
    ToolError,
    add_output_options,
    parse_list,
    publish,
    start_report,
    tool_parser,
)
from tools.shapes import add_model_options, describe, load_from_args

TOOL = "eval_longctx"
# Settings that must match for a saved run to be continued.
RESUMABLE = (
    "tasks", "lengths", "samples", "seed", "source", "configs", "query_aware", "turns", "model_path",
    "dtype", "full_beyond_window", "cases_digest",
)  # fmt: skip


def parser() -> argparse.ArgumentParser:
    p = tool_parser(TOOL, __doc__)
    presets = "; ".join(f"{name}: {','.join(tasks)}" for name, tasks in PRESETS.items())
    p.add_argument(
        "--tasks",
        default="core",
        help=f"comma list of tasks ({', '.join(TASKS)}) and presets ({presets}) (default: %(default)s)",
    )
    p.add_argument(
        "--lengths", default="2048,4096,8192,16384", help="prompt tokens, comma list (default: %(default)s)"
    )
    p.add_argument("--samples", type=int, default=3, help="cases per task and length (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of every case (default: %(default)s)")
    p.add_argument("--source", choices=SOURCES, default="pydoc", help="haystack prose (default: %(default)s)")
    add_config_options(p, default="full,imdc:snapkv:1024")
    p.add_argument(
        "--query-aware",
        action="store_true",
        help="read the document together with the (first) question and compress by its attention",
    )
    p.add_argument(
        "--turns",
        type=int,
        default=1,
        help="questions per document, asked one after another over one memory (default: %(default)s)",
    )
    p.add_argument(
        "--full-beyond-window", action="store_true", help="also run 'full' past the model's trained window"
    )
    add_model_options(p, shapes=False)
    add_output_options(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run_main(lambda: _run(args, argv), debug=args.debug)


def _run(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    tasks = expand_tasks(args.tasks)
    lengths = parse_list(args.lengths, int, "--lengths")
    if args.samples < 1 or args.turns < 1:
        raise ToolError("--samples and --turns must be at least 1")
    single = [task for task in tasks if not TASKS[task].multi_turn]
    if args.turns > 1 and single:
        raise ToolError(
            f"--turns {args.turns}: {', '.join(single)} ask one question per document; leave them out"
        )
    configs = configs_from_args(args, reform=True)
    llm = load_from_args(args)
    cases = _cases(llm, tasks, lengths, args)
    settings = {
        "tasks": tasks,
        "lengths": lengths,
        "samples": args.samples,
        "seed": args.seed,
        "source": args.source,
        "configs": [named.label for named in configs],
        "query_aware": args.query_aware,
        "turns": args.turns,
        "full_beyond_window": args.full_beyond_window,
        "window": llm.config.max_position_embeddings,
        "python": sys.version.split()[0],
        "cases_digest": _digest(cases),
        **describe(llm),
    }
    report = _resume(args.json, settings) or {**start_report(TOOL, argv, llm.device, settings), "records": []}
    done = {_key(record) for record in report["records"]}
    todo = [
        (named, case)
        for case in sorted(cases, key=lambda case: case.length)
        for named in configs
        if (named.label, case.task, case.length, case.sample) not in done
        and _runs(named, case, settings, args)
    ]
    with tqdm(total=len(todo), desc=TOOL, unit="case") as bar:
        for named, case in todo:
            report["records"] += _attempt(llm, named, case, args.query_aware)
            if args.json:
                _save(report, args.json)
            bar.update()
            bar.set_postfix(config=named.label, task=case.task, length=case.length)
    skipped = [named.label for named in configs if not named.bounded and not args.full_beyond_window]
    beyond = [length for length in lengths if length > settings["window"]]
    if skipped and beyond:
        note = (
            f"full attention was not run at {', '.join(map(str, beyond))} tokens, past the model's "
            f"{settings['window']}-token window (--full-beyond-window runs it)"
        )
        if note not in report["notes"]:
            report["notes"].append(note)
    report["complete"] = True
    publish(report, tables, json_path=args.json, plot_path=args.plot, draw=draw)
    return 0


def _cases(llm: LLM, tasks: list[str], lengths: list[int], args: argparse.Namespace) -> list[Case]:
    if llm.tokenizer is None:
        raise ToolError("the long-context tasks need a checkpoint with a tokenizer (--model DIR)")
    grid = [(task, length, sample) for task in tasks for length in lengths for sample in range(args.samples)]
    return [
        make_case(
            task, llm.tokenizer, length, seed=args.seed, sample=sample, source=args.source, turns=args.turns
        )
        for task, length, sample in tqdm(grid, desc="building cases", unit="case", leave=False)
    ]


def _digest(cases: list[Case]) -> str:
    """A fingerprint of every case's text: a run is continued only over exactly the same cases (the
    prose comes from the standard library, which another Python version may word differently)."""
    text = json.dumps([[c.document, [[q.text, q.expected] for q in c.questions]] for c in cases])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _runs(named: NamedConfig, case: Case, settings: dict[str, Any], args: argparse.Namespace) -> bool:
    """Whether this config is run on this case: full attention stops at the model's window."""
    return named.bounded or args.full_beyond_window or case.tokens <= settings["window"]


def _key(record: dict[str, Any]) -> tuple[str, str, int, int]:
    return record["config"], record["task"], record["length"], record["sample"]


def _attempt(llm: LLM, named: NamedConfig, case: Case, query_aware: bool) -> list[dict[str, Any]]:
    """Read the case's document, ask each of its questions in turn; one record per question."""
    session = ChatSession(
        llm, prefill=named.config, sampling=GREEDY, document=case.document, query_aware=query_aware
    )
    turns = []
    load = os.getloadavg()[0]  # other work on the machine slows the timings: recorded beside them
    with Stopwatch(llm.device) as watch:
        for question in case.questions:
            completion = session.ask(question.text, max_tokens=case.answer_tokens, progress=False)
            document = session.document_prefill if not turns and session.document_prefill else None
            turns.append((question, completion, document.seconds if document else 0.0))
    records = []
    for turn, (question, completion, document_seconds) in enumerate(turns):
        memory = completion.memory
        records.append(
            {
                "config": named.label,
                "task": case.task,
                "length": case.length,
                "sample": case.sample,
                "turn": turn,
                "prompt_tokens": case.tokens,
                "details": case.details,
                "question": question.text,
                "expected": list(question.expected),
                "depths": list(question.depths),
                "answer": completion.text,
                "score": score(completion.text, question.expected),
                "prefill_seconds": document_seconds + completion.prefill.seconds,
                "decode_seconds": completion.decode_seconds,
                "memory_tokens": memory.kept(),
                "memory_bytes": memory.nbytes,
                "peak_bytes": watch.timing.peak_bytes,
                "added_bytes": watch.timing.added_bytes,
                "load_average": load,
                "threads": torch.get_num_threads(),
            }
        )
    return records


def _resume(path: str | None, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The saved report at ``path`` to continue, None when there is none; refused if it is another run."""
    if not path or not Path(path).is_file():
        return None
    try:
        report = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ToolError(
            f"--json {path} exists but is not a readable report ({error}); move it away"
        ) from None
    if not isinstance(report, dict) or report.get("tool") != TOOL:
        raise ToolError(f"--json {path} holds another tool's report; give another path")
    saved = report.get("settings", {})
    different = [name for name in RESUMABLE if saved.get(name) != settings.get(name)]
    if different:
        raise ToolError(
            f"--json {path} holds a run with other settings ({', '.join(different)}); give another path, "
            "or delete it to start again"
        )
    return report


def _save(report: dict[str, Any], path: str) -> None:
    """Write the partial report atomically: a stop mid-write must not lose what was measured."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    partial.write_text(json.dumps({**report, "complete": False}, indent=2) + "\n", encoding="utf-8")
    os.replace(partial, target)


def _mean(values: list[float]) -> float | None:
    return statistics.mean(values) if values else None


def _accuracy(records: list[dict[str, Any]]) -> float | None:
    """Mean score in percent over the records' tasks (each task weighs the same), None when empty."""
    by_task: dict[str, list[float]] = {}
    for record in records:
        by_task.setdefault(record["task"], []).append(record["score"])
    means = [statistics.mean(scores) for scores in by_task.values()]
    return 100 * statistics.mean(means) if means else None


def tables(report: dict[str, Any]) -> list[Table]:
    settings, records = report["settings"], report["records"]
    configs, lengths, tasks = settings["configs"], settings["lengths"], settings["tasks"]
    aware = "query-aware" if settings["query_aware"] else "question-agnostic"
    turns = settings["turns"]
    where = f"{settings['model']}, {aware}, {settings['samples']} samples, {settings['source']} haystack"
    if turns > 1:
        where += f", {turns} questions per document"

    def pick(**match: object) -> list[dict[str, Any]]:
        return [r for r in records if all(r[key] == value for key, value in match.items())]

    notes = ["All tasks weigh the same in a mean; '-': not run (see the notes)."]
    notes += _baseline_note(records, lengths, tasks)
    notes += _load_note(records, report["machine"].get("cores") or 1)
    summary = Table(
        f"Accuracy % by prompt length, mean over tasks ({where})",
        ["config", *[f"L={length}" for length in lengths], "all", "prefill s", "peak GiB", "memory MiB"],
        [
            [config]
            + [_accuracy(pick(config=config, length=length)) for length in lengths]
            + [
                _accuracy(pick(config=config)),
                _mean([r["prefill_seconds"] for r in pick(config=config, turn=0)]),
                max((r["peak_bytes"] for r in pick(config=config)), default=0) / GIB or None,
                _mean([r["memory_bytes"] / MIB for r in pick(config=config)]),
            ]
            for config in configs
        ],
        notes=tuple(notes),
    )
    per_config = [
        Table(
            f"{config}: accuracy % by task and prompt length",
            ["task", *[f"L={length}" for length in lengths], "all"],
            [
                [task]
                + [_accuracy(pick(config=config, task=task, length=length)) for length in lengths]
                + [_accuracy(pick(config=config, task=task))]
                for task in tasks
            ],
        )
        for config in configs
    ]
    result = [summary, *per_config]
    if turns > 1:
        result.insert(
            1,
            Table(
                f"Accuracy % by question, all lengths ({where})",
                ["config", *[f"question {turn + 1}" for turn in range(turns)]],
                [
                    [config] + [_accuracy(pick(config=config, turn=turn)) for turn in range(turns)]
                    for config in configs
                ],
            ),
        )
    return result


FLOOR = 20.0  # % a task must reach with full attention for compression's effect on it to be measurable


def _baseline_note(records: list[dict[str, Any]], lengths: list[int], tasks: list[str]) -> list[str]:
    """What the model can do at all: full attention's score per task at the shortest length run."""
    full = [r for r in records if r["config"] == FULL]
    measured = [length for length in lengths if any(r["length"] == length for r in full)]
    if not measured:
        return []
    shortest = min(measured)
    scores = {
        task: _accuracy([r for r in full if r["task"] == task and r["length"] == shortest]) for task in tasks
    }
    scores = {task: value for task, value in scores.items() if value is not None}
    weak = [task for task, value in scores.items() if value < FLOOR]
    listed = ", ".join(f"{task} {value:.0f}%" for task, value in scores.items())
    note = f"How to read it: with full attention at L={shortest} the model scores {listed}."
    if weak:
        note += (
            f" It cannot do {', '.join(weak)} (under {FLOOR:.0f}%) even then: those rows measure nothing "
            "about compression."
        )
    return [note]


def _load_note(records: list[dict[str, Any]], cores: int) -> list[str]:
    """Timings taken while other work shared the CPU are said to be so (accuracy does not depend on it)."""
    loads = [r["load_average"] for r in records if "load_average" in r]
    busy = len(loads) < len(records) or (loads and statistics.mean(loads) > 1.25 * cores)
    if not busy:
        return []
    shown = (
        f"mean load average {statistics.mean(loads):.1f} on {cores} cores" if loads else "load not recorded"
    )
    return [
        f"The seconds and memory columns were measured while other evaluations shared the machine ({shown}): "
        "they show the order of magnitude only; the benchmark tables are measured alone."
    ]


def draw(pyplot, report: dict[str, Any]):
    settings, records = report["settings"], report["records"]
    configs, lengths, tasks = settings["configs"], settings["lengths"], settings["tasks"]
    size = (2.2 + (0.7 * len(lengths) + 1) * len(configs), 0.45 * len(tasks) + 2)
    figure, axes = pyplot.subplots(1, len(configs), figsize=size, squeeze=False, sharey=True)
    for axis, config in zip(axes[0], configs, strict=True):
        grid = []
        for task in tasks:
            row = []
            for length in lengths:
                cell = [r for r in records if (r["config"], r["task"], r["length"]) == (config, task, length)]
                value = _accuracy(cell)
                row.append(float("nan") if value is None else value)
            grid.append(row)
        image = axis.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
        axis.set_xticks(range(len(lengths)), [str(length) for length in lengths], rotation=45)
        axis.set_yticks(range(len(tasks)), tasks)
        axis.set_title(config, fontsize=8)
        axis.set_xlabel("prompt tokens")
    figure.colorbar(image, ax=axes[0].tolist(), label="accuracy %")
    aware = "query-aware" if settings["query_aware"] else "question-agnostic"
    figure.suptitle(f"long-context tasks ({aware}, {settings['model']})")
    return figure


if __name__ == "__main__":
    sys.exit(main())
