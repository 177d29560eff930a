"""Render ``docs/RESULTS.md`` from the JSON reports the benchmark and evaluation tools wrote into ``docs/``.

    python -m tools.results [--docs docs] [--output docs/RESULTS.md]

Every number in the page comes from a report's JSON, through the same ``tables`` function that printed
it when the tool ran; the paper's numbers come from the constants of the tool they belong to. Run the
commands of ``RUNS`` (listed in the page under "How to reproduce"), then this, to regenerate it all.
A report whose command differs from its full-run command is marked as a smaller (smoke) run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.cli import run_main
from tools.bench_prefill import PAPER_TABLE_A, paper_rows
from tools.eval_ppl import PAPER_TABLE_B
from tools.report import Table, describe_machine, render, tool_parser

TOOLS = (
    "bench_prefill",
    "eval_passkey",
    "eval_ppl",
    "bench_generate",
    "eval_longctx",
    "bench_reform",
    "bench_heads",
    "bench_serve",
)
DOCS = Path("docs")


@dataclass(frozen=True)
class Run:
    title: str
    where: str
    command: str

    @property
    def argv(self) -> list[str]:
        return shlex.split(self.command)[3:]  # after "python -m tools.X"

    @property
    def tool(self) -> str:
        return shlex.split(self.command)[2].removeprefix("tools.")

    @property
    def json_name(self) -> str:
        argv = self.argv
        return Path(argv[argv.index("--json") + 1]).name

    def made(self, report: dict[str, Any]) -> bool:
        """Whether ``report`` comes from exactly this run's command (not from a smaller, smoke run)."""
        return report["argv"] == self.argv


def _command(tool: str, options: str, stem: str) -> str:
    return f"python -m tools.{tool} {options} --json docs/{stem}.json --plot docs/{stem}.png"


PASSKEY_CONFIGS = ",".join(
    ["full"] + [f"{s}:{p}:1024" for p in ("snapkv", "streaming") for s in ("fixed", "im", "imdc")]
)
# Full attention does not depend on the question: the question-agnostic run already measures it.
PASSKEY_AWARE_CONFIGS = "imdc:snapkv:1024:kernel=9"
PPL_CONFIGS = ",".join(
    ["full"]
    + [
        f"{s}:{p}:1024:1024{option}"
        for p, option in (("snapkv", ":window=chunk"), ("streaming", ""))
        for s in ("fixed", "im", "imdc")
    ]
)
PASSKEY_SWEEP = "--lengths 1500,4000,8000 --depths 0.1,0.5,0.9 --keys 5"
LONGCTX_CONFIGS = "full,imdc:snapkv:1024,imdc:h2o:1024,imdc:streaming:1024,imdc:tova:1024"
LONGCTX_GRID = "--tasks core --lengths 2048,4096,8192,16384 --samples 3"
LONGCTX_TURNS = (
    "--tasks niah_single,niah_multikey,niah_multivalue,vt,qa1,qa2 --lengths 4096 --samples 3 --turns 3"
)
# REFORM against its own reading policy at the same memory (SnapKV's pass-key results are in passkey.json).
REFORM_PASSKEY_CONFIGS = ",".join(
    ["full"]
    + [f"imdc:h2o:{memory}" for memory in (256, 1024)]
    + [f"reform:imdc:h2o:{memory}" for memory in (256, 1024)]
)
# Head-wise budgets and roles at the same mean budget, on the tasks the default model can do with full
# attention (docs: longctx.json); quoted, since the wrappers' parentheses mean something to a shell.
HEADS_METHODS = ("snapkv", "adakv(snapkv)", "adakv(h2o)", "razor", "duo", "compresskv", "ems", "uncomp")
HEADS_GRID = (
    "--tasks niah_single,niah_multikey,niah_multivalue,passkey --lengths 2048,4096,8192,16384 --samples 2 "
    "--chunk 1024"
)


def heads_grid(memory: int, full: bool) -> str:
    configs = ["full"] * full + [f"imdc:{method}:{memory}" for method in HEADS_METHODS]
    return f"{HEADS_GRID} --configs '{','.join(configs)}'"


REFORM_PASSKEY = "--tasks passkey --lengths 1536,4096,8192,16384,32768 --samples 9"
# A quantized memory against a plain one: M=1024 at 8 bits takes about the bytes of M=256 in float32.
KV_BITS_CONFIGS = (
    "full,imdc:snapkv:256,imdc:snapkv:1024,imdc:snapkv:1024:kv_bits=8,imdc:snapkv:1024:kv_bits=4"
)


def mikv_configs(size: str) -> str:
    """At the same bytes ``size``: evict, quantize everything, or demote."""
    return (
        f"full,fixed:snapkv:{size},fixed:h2o:{size},fixed:mikv:{size},fixed:mikv:{size}:bits=2,"
        f"fixed:snapkv:{size}:kv_bits=8,fixed:snapkv:{size}:kv_bits=4"
    )


# POD over full attention at thresholds 0.5 / 0.7 / 0.9 (and 0.5 with the key adapter), and SnapKV at the
# bytes POD at 0.5 would hold
# (the default model's blocks: 14% of K and V saved at 4096 tokens, 16.5% at 8192, engine.pod.PodPlan).
POD_CONFIGS = (
    "full,full:pod=0.5,full:pod=0.7,full:pod=0.9,full:pod=0.5:pod_adapt=1,"
    "fixed:snapkv:3520:1024,fixed:snapkv:6840:1024"
)
RUNS = (
    Run(
        "Prefill schedules on the CPU, SnapKV (default model)",
        "CPU",
        _command("bench_prefill", "--length 8192 --memory 1024 --chunk 1024 --policy snapkv --repeat 3",
                 "bench_prefill_cpu_snapkv"),
    ),
    Run(
        "Prefill schedules on the CPU, StreamingLLM (default model)",
        "CPU",
        _command("bench_prefill", "--length 8192 --memory 1024 --chunk 1024 --policy streaming --repeat 3",
                 "bench_prefill_cpu_streaming"),
    ),
    Run(
        "The paper's cell on a GPU: LLaMA-2-7B shape, L=32768",
        "GPU",
        _command("bench_prefill", "--shape llama2-7b --length 32768 --memory 256,512,1024 --chunk 1024 "
                 "--policy snapkv --policy-arg window=chunk --repeat 5", "bench_prefill_gpu_32k"),
    ),
    Run(
        "LLaMA-2-7B shape at L=131072 on a GPU",
        "GPU",
        _command("bench_prefill", "--shape llama2-7b --length 131072 --memory 1024 --chunk 1024 "
                 "--policy snapkv --policy-arg window=chunk --repeat 3", "bench_prefill_gpu_128k"),
    ),
    Run(
        "Pass-key retrieval, question-agnostic compression",
        "CPU",
        _command("eval_passkey", f"{PASSKEY_SWEEP} --configs {PASSKEY_CONFIGS}", "passkey"),
    ),
    Run(
        "Pass-key retrieval, query-aware compression",
        "CPU",
        _command("eval_passkey", f"{PASSKEY_SWEEP} --configs {PASSKEY_AWARE_CONFIGS} --query-aware",
                 "passkey_query_aware"),
    ),
    Run(
        "Pass-key retrieval beyond the model's 8k window",
        "CPU",
        _command("eval_passkey", "--lengths 16000 --depths 0.1,0.5,0.9 --keys 1 "
                 "--configs full,imdc:snapkv:1024:kernel=9 --query-aware", "passkey_beyond_window"),
    ),
    Run(
        "Last-chunk perplexity on standard library source",
        "CPU",
        _command("eval_ppl", f"--length 8192 --samples 3 --eval-tokens 1024 --configs {PPL_CONFIGS}", "ppl"),
    ),
    Run(
        "Long-context tasks (RULER- and BABILong-style), question-agnostic compression",
        "CPU",
        _command("eval_longctx", f"{LONGCTX_GRID} --configs {LONGCTX_CONFIGS}", "longctx"),
    ),
    Run(
        "Long-context tasks, query-aware compression",
        "CPU",
        _command(
            "eval_longctx", f"{LONGCTX_GRID} --configs imdc:snapkv:1024 --query-aware", "longctx_query_aware"
        ),
    ),
    Run(
        "Long-context tasks, three questions about one document (multi-turn)",
        "CPU",
        _command("eval_longctx", f"{LONGCTX_TURNS} --configs {LONGCTX_CONFIGS}", "longctx_multiturn"),
    ),
    Run(
        "REFORM: pass key beyond the window, question-agnostic (3 depths x 3 keys)",
        "CPU",
        _command(
            "eval_longctx",
            f"{REFORM_PASSKEY} --configs {REFORM_PASSKEY_CONFIGS}",
            "reform_passkey",
        ),
    ),
    Run(
        "REFORM's pass key: SnapKV at the same memories",
        "CPU",
        _command(
            "eval_longctx",
            f"{REFORM_PASSKEY} --configs imdc:snapkv:256,imdc:snapkv:1024",
            "reform_passkey_snapkv",
        ),
    ),
    Run(
        "REFORM: long-context tasks",
        "CPU",
        _command(
            "eval_longctx",
            "--tasks core --lengths 4096,8192,16384 --samples 3 --configs reform:imdc:h2o:1024",
            "reform_longctx",
        ),
    ),
    Run(
        "REFORM: long-context tasks at M = 256, beside imdc at the same memory",
        "CPU",
        _command(
            "eval_longctx",
            "--tasks core --lengths 4096,8192,16384 --samples 1 "
            "--configs reform:imdc:h2o:256,imdc:h2o:256,imdc:snapkv:256",
            "reform_longctx_256",
        ),
    ),
    Run(
        "REFORM: three questions about one document",
        "CPU",
        _command(
            "eval_longctx",
            f"{LONGCTX_TURNS} --configs reform:imdc:h2o:1024,reform:imdc:h2o:1024:gather=2048",
            "reform_multiturn",
        ),
    ),
    Run(
        "REFORM: time to first token and memory against imdc and full",
        "CPU",
        _command("bench_reform", "--lengths 8192,16384,32768 --memory 1024 --chunk 1024", "bench_reform"),
    ),
    Run(
        "Heads with budgets and roles of their own, M = 1024",
        "CPU",
        _command(
            "eval_longctx", heads_grid(1024, full=True), "heads_1024"
        ),
    ),
    Run(
        "Heads with budgets and roles of their own, M = 256",
        "CPU",
        _command(
            "eval_longctx", heads_grid(256, full=False), "heads_256"
        ),
    ),
    Run(
        "A quantized memory: more tokens at fewer bits, or fewer at full precision?",
        "CPU",
        _command(
            "eval_longctx",
            "--tasks passkey,niah_single,niah_multikey,qa1 --lengths 4096,8192 --samples 2 --chunk 1024 "
            f"--configs {KV_BITS_CONFIGS}",
            "kv_bits",
        ),
    ),
    Run(
        "Demote instead of evict (MiKV) at equal bytes: 17 MiB, the bytes of M=256 float32 tokens",
        "CPU",
        _command(
            "eval_longctx",
            "--tasks passkey,niah_single,niah_multikey,qa1 --lengths 4096,8192,16384 --samples 2 "
            f"--chunk 1024 --configs {mikv_configs('17MiB')}",
            "mikv_17mib",
        ),
    ),
    Run(
        "Demote instead of evict (MiKV) at equal bytes: 68 MiB, the bytes of M=1024 float32 tokens",
        "CPU",
        _command(
            "eval_longctx",
            "--tasks passkey,niah_single,niah_multikey,qa1 --lengths 4096,8192 --samples 2 "
            f"--chunk 1024 --configs {mikv_configs('68MiB')}",
            "mikv_68mib",
        ),
    ),
    Run(
        "Per-head memory against the rectangular one: bytes, prefill and decode time",
        "CPU",
        _command(
            "bench_heads",
            "--length 8192 --decode-tokens 64 --repeat 3 "
            "--configs 'imdc:snapkv:1024,imdc:adakv(snapkv):1024,imdc:razor:1024,imdc:duo:1024'",
            "bench_heads",
        ),
    ),
    Run(
        "Demote or quantize against the plain memory at the same tokens: bytes, prefill and decode time",
        "CPU",
        _command(
            "bench_heads",
            "--length 8192 --decode-tokens 64 --repeat 3 --configs "
            "'imdc:h2o:1024,imdc:mikv:1024,imdc:mikv:1024:bits=2,imdc:snapkv:1024,imdc:snapkv:1024:kv_bits=4'",
            "bench_mikv",
        ),
    ),
    Run(
        "POD, training-free: long-context tasks inside the window, against SnapKV at POD's bytes",
        "CPU",
        _command(
            "eval_longctx",
            "--tasks passkey,niah_single,niah_multikey --lengths 4096,8192 --samples 2 "
            f"--chunk 1024 --configs {POD_CONFIGS}",
            "pod_longctx",
        ),
    ),
    Run(
        "POD, training-free: last-chunk perplexity",
        "CPU",
        _command(
            "eval_ppl", "--length 8192 --samples 2 --eval-tokens 1024 "
            "--configs full,full:pod=0.5,full:pod=0.7,full:pod=0.9,full:pod=0.5:pod_adapt=1", "pod_ppl",
        ),
    ),
    Run(
        "POD attention against dense attention: prefill and decode time",
        "CPU",
        _command(
            "bench_heads",
            "--length 4096 --decode-tokens 32 --repeat 3 --configs full,full:pod=0.5",
            "bench_pod",
        ),
    ),
    Run(
        "The server: concurrent clients and conversation reuse",
        "CPU",
        _command(
            "bench_serve", "--clients 1,4,16 --tokens 32 --document 4096 --turns 3 --config imdc:snapkv:1024",
            "bench_serve",
        ),
    ),
    Run(
        "Prefill and decode speed against transformers and llama.cpp",
        "CPU",
        _command("bench_generate", "--lengths 512,2048,8192 --decode-tokens 64 "
                 "--configs full,imdc:snapkv:1024 --repeat 1", "bench_generate"),
    ),
)  # fmt: skip

SMOKE_NOTE = (
    "**Smoke run.** These numbers come from a smaller run than the full setting (its command is in "
    '"How to reproduce"); they show that the tool works, not what the engine achieves.'
)

PARTIAL_NOTE = (
    "**Partial run.** The run was stopped before it measured every case (it is resumable: its "
    "command continues it); a cell without a number is not measured yet."
)


# A run measured alone, compared with configs of another run on the cases both measured.
BESIDE = {
    "reform_passkey.json": ("reform_passkey_snapkv.json", ("imdc:snapkv:256:256", "imdc:snapkv:1024:1024")),
    "reform_longctx.json": ("longctx.json", ("full", "imdc:h2o:1024:1024", "imdc:snapkv:1024:1024")),
    "reform_multiturn.json": (
        "longctx_multiturn.json",
        ("full", "imdc:h2o:1024:1024", "imdc:snapkv:1024:1024"),
    ),
    "heads_256.json": ("heads_1024.json", ("full",)),
    "reform_longctx_256.json": ("longctx.json", ("full",)),
}


def _beside(name: str, reports: dict[str, dict[str, Any]]) -> list[Table]:
    """The comparison ``BESIDE`` names for the report ``name``, when both reports exist."""
    if name not in BESIDE or name not in reports or BESIDE[name][0] not in reports:
        return []
    from tools.eval_longctx import _accuracy

    report, (other_name, configs) = reports[name], BESIDE[name]

    def key(record: dict[str, Any]) -> tuple[Any, ...]:
        return record["task"], record["length"], record["sample"], record["turn"], tuple(record["expected"])

    cases = {key(record) for record in report["records"]}
    theirs = [r for r in reports[other_name]["records"] if r["config"] in configs and key(r) in cases]
    records = report["records"] + theirs
    lengths = report["settings"]["lengths"]
    labels = [*report["settings"]["configs"], *configs]

    def accuracy(config: str, **match: object) -> float | None:
        chosen = [r for r in records if r["config"] == config and all(r[k] == v for k, v in match.items())]
        return _accuracy(chosen)

    turns = report["settings"]["turns"]
    columns = [f"question {turn + 1}" for turn in range(turns)] if turns > 1 else [f"L={n}" for n in lengths]
    matches = [{"turn": turn} for turn in range(turns)] if turns > 1 else [{"length": n} for n in lengths]
    return [
        Table(
            f"{', '.join(report['settings']['configs'])} beside {other_name}'s configs on the same cases "
            "(accuracy %, mean over tasks)",
            ["config", *columns, "all"],
            [[label, *[accuracy(label, **match) for match in matches], accuracy(label)] for label in labels],
            notes=(f"The other configs' answers come from {other_name}: the same generated cases (task, "
                   "length, sample and expected answers matched), measured in another run.",),
        )
    ]  # fmt: skip


def render_results(docs: Path) -> str:
    reports = _reports(docs)
    known = {run.json_name for run in RUNS}
    parts = [
        "# Results",
        "Generated by `python -m tools.results` from the JSON reports in `docs/`; do not edit by hand. "
        "Each section says where, when and with which exact command its numbers were measured.",
    ]
    for run in RUNS:
        parts.append(f"## {run.title}")
        report = reports.get(run.json_name)
        if report is None:
            parts.append(f"Not measured yet: run `{run.command}` on a {run.where} machine.")
            continue
        parts.append(_section(report, docs, smoke=not run.made(report)))
        parts += [table.markdown() for table in _beside(run.json_name, reports)]
    for name, report in reports.items():
        if name not in known:
            parts += [f"## {report['tool']} ({name})", _section(report, docs, smoke=False)]
    parts += ["## The papers' numbers", *[table.markdown() for table in paper_tables()]]
    parts += ["## How to reproduce", _reproduce()]
    return "\n\n".join(parts) + "\n"


README_START = "<!-- results:start (python -m tools.results writes this block) -->"
README_END = "<!-- results:end -->"
# The runs the README shows, in this order, with which of each run's tables.
README_RUNS = {
    "bench_generate.json": (0, 1),
    "bench_prefill_cpu_snapkv.json": (0,),
    "passkey.json": (0, 2),
    "passkey_query_aware.json": (0,),
    "passkey_beyond_window.json": (0,),
    "ppl.json": (0,),
    "longctx.json": (0,),
    "longctx_query_aware.json": (0,),
    "longctx_multiturn.json": (1,),
    "reform_passkey.json": (0,),
    "reform_longctx.json": (0,),
    "reform_multiturn.json": (1,),
    "bench_reform.json": (0,),
    "heads_1024.json": (0,),
    "heads_256.json": (0,),
    "kv_bits.json": (0,),
    "mikv_17mib.json": (0,),
    "mikv_68mib.json": (0,),
    "bench_heads.json": (0,),
    "bench_mikv.json": (0,),
    "pod_longctx.json": (0,),
    "pod_ppl.json": (0,),
    "bench_pod.json": (0,),
    "bench_serve.json": (0, 1),
}


def readme_block(docs: Path) -> str:
    """The README's headline tables from each full (not smoke) run, with where and when."""
    reports = _reports(docs)
    full_runs = {run.json_name: run for run in RUNS}
    parts = []
    for name, shown in README_RUNS.items():
        report = reports.get(name)
        if report is None or not full_runs[name].made(report):
            continue
        tables = _tables(report)
        beside = _beside(name, reports)
        parts += [table.markdown() for table in beside] or [tables[index].markdown() for index in shown]
        partial = " (partial run: a cell without a number is not measured yet)" if _partial(report) else ""
        parts.append(
            f"<sub>{describe_machine(report['machine'])}, {report['date'][:10]}{partial}: "
            f"`{report['command']}`</sub>"
        )
    if not parts:
        parts.append("No full measurement yet: see docs/RESULTS.md for the commands.")
    return "\n\n".join([README_START, *parts, README_END])


def update_readme(readme: Path, docs: Path) -> bool:
    """Replace the README's results block, if it has one; True when it did."""
    text = readme.read_text(encoding="utf-8")
    if README_START not in text or README_END not in text:
        return False
    before, rest = text.split(README_START, 1)
    after = rest.split(README_END, 1)[1]
    readme.write_text(before + readme_block(docs) + after, encoding="utf-8")
    return True


def _reports(docs: Path) -> dict[str, dict[str, Any]]:
    reports = {}
    for path in sorted(docs.glob("*.json")):
        try:
            report = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"{path} is not a readable JSON report ({error}); re-run its tool") from None
        if isinstance(report, dict) and report.get("tool") in TOOLS:
            reports[path.name] = report
    return reports


def _tables(report: dict[str, Any]) -> list[Table]:
    """The tables of a report, drawn by the tool that made it."""
    return importlib.import_module(f"tools.{report['tool']}").tables(report)


def _section(report: dict[str, Any], docs: Path, *, smoke: bool) -> str:
    text = render(report, _tables(report))
    if report.get("plot") and (docs / report["plot"]).is_file():
        text += f"\n\n![{report['tool']}]({report['plot']})"
    notes = [SMOKE_NOTE] * smoke + [PARTIAL_NOTE] * _partial(report)
    return "\n\n".join([*notes, text])


def _partial(report: dict[str, Any]) -> bool:
    """Whether a resumable run was stopped before it measured every case."""
    return report.get("complete") is False


def paper_tables() -> list[Table]:
    """Zeng et al. 2024 (EMNLP), the numbers our tools put beside theirs, with ratios to FM; and POD's
    trained numbers, to contrast with the training-free ones measured here."""
    prefill_rows = [
        [row["schedule"], row["memory"], row["seconds"], row["peak_gb"], row["speedup_vs_fixed"],
         row["memory_vs_fixed"]]
        for row in paper_rows(list(PAPER_TABLE_A), ["fixed", "im", "imdc"])
    ]  # fmt: skip
    ppl_rows = []
    for (policy, chunk, memory), cell in PAPER_TABLE_B.items():
        for schedule, (github, arxiv) in cell.items():
            ppl_rows.append([policy, chunk, memory, schedule, str(github), str(arxiv)])
    return [
        Table(
            "Paper, Table A: TTFT and peak GPU memory (A800-80GB, eager attention, SnapKV-style scores, "
            "LLaMA-2-7B, bf16, L=32768, c=1024)",
            ["schedule", "M", "TTFT s", "peak GB", "speed-up vs fixed", "memory vs fixed"],
            prefill_rows,
        ),
        Table(
            "Paper, Table B: last-chunk perplexity, github / arxiv sets (LLaMA-2-7B, L=32768; "
            "full attention: 7.57 / 11.10)",
            ["policy", "c", "M", "schedule", "github", "arxiv"],
            ppl_rows,
        ),
        pod_paper_table(),
    ]


# POD's headline (Ma et al., arXiv 2412.02252 v2, as secondary summaries of the full text report it):
# LLaMA3-8B-32K, all methods keeping 4096 of 32768 tokens; POD after ~5B tokens of continued training.
PAPER_POD = (
    ("SnapKV", 87.5, 4.3), ("PyramidKV", 93.6, 3.4), ("StreamingLLM", 87.5, 8.0), ("H2O", 87.5, 7.4),
    ("CLA (not retrained)", 50.0, 31.4), ("POD (trained)", 35.0, 2.8), ("POD + SnapKV (trained)", 91.9, 3.1),
)  # fmt: skip


def pod_paper_table() -> Table:
    return Table(
        "POD paper: KV saving and average performance drop against the dense model (LLaMA3-8B-32K; POD "
        "continued-trained on ~5B tokens, the others not; from summaries of the full text)",
        ["method", "KV saving %", "drop %"],
        [list(row) for row in PAPER_POD],
    )


def _reproduce() -> str:
    lines = [
        "Run these from the repository root on a quiet machine (nothing else running), then "
        "`python -m tools.results`. The CPU runs use the default model (SmolLM2-135M-Instruct); "
        "the GPU runs build random weights of the LLaMA-2-7B shape, since timing does not depend "
        "on weight values.",
        "",
    ]
    for run in RUNS:
        lines += [f"- {run.title} ({run.where}):", "", f"  ```\n  {run.command}\n  ```", ""]
    return "\n".join(lines).rstrip()


def parser() -> argparse.ArgumentParser:
    p = tool_parser("results", __doc__)
    p.add_argument("--docs", default=str(DOCS), help="folder of the JSON reports (default: %(default)s)")
    p.add_argument("--output", help="page to write (default: DOCS/RESULTS.md)")
    p.add_argument(
        "--readme", default="README.md", help="README whose results block is refreshed (default: %(default)s)"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def write() -> int:
        docs = Path(args.docs)
        if not docs.is_dir():
            raise FileNotFoundError(
                f"--docs {docs}: no such folder; run the tools with --json {docs}/NAME.json"
            )
        output = Path(args.output) if args.output else docs / "RESULTS.md"
        output.write_text(render_results(docs), encoding="utf-8")
        print(f"wrote {output}")
        if Path(args.readme).is_file() and update_readme(Path(args.readme), docs):
            print(f"refreshed the results block of {args.readme}")
        return 0

    return run_main(write, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
