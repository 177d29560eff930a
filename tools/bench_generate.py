"""Prefill and decode speed against peers, on the same checkpoint and the same prompt ids.

    python -m tools.bench_generate --lengths 512,2048,8192,16384 --decode-tokens 64

Engines: this one with float32 weights and with float16 weights (``--weight-dtypes``), each with
every ``--configs`` entry (full attention, and a bounded memory that decoding also keeps within M);
``transformers`` in float32 (one forward with a cache, then a greedy loop over ``past_key_values``);
``llama.cpp`` (llama-cpp-python) on the GGUF file the default model was converted from. Every
engine is timed the same way: the prompt's forward pass, then ``--decode-tokens`` greedy tokens, each
fed back one at a time. Prompts are standard library source (the ``eval_ppl`` corpus). With a bounded
memory, decoding costs the same however long the prompt was; full caches slow down as they grow.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy
import torch
from tqdm import tqdm

from engine.cli import run_main
from engine.generate import GREEDY
from engine.llm import LLM, load
from tools.eval_ppl import corpus_samples
from tools.measure import Stopwatch, Timing, repeated
from tools.prefill_specs import NamedConfig, add_config_options, configs_from_args, with_options
from tools.report import (
    MIB,
    Table,
    ToolError,
    add_output_options,
    parse_list,
    publish,
    ratio,
    start_report,
    tool_parser,
)
from tools.shapes import describe

TOOL = "bench_generate"
TRANSFORMERS = "transformers fp32"
LLAMA_CPP = "llama.cpp"
ENGINES = ("ours", "transformers", "llama.cpp")
WEIGHT_LABELS = {"float32": "fp32", "float16": "fp16 weights", "bfloat16": "bf16 weights"}


class Engine(Protocol):
    label: str

    def prefill(self, ids: list[int]) -> Any: ...  # returns what decode continues from

    def decode(self, state: Any, count: int) -> list[int]: ...  # greedy, each token fed back


@dataclass
class OurEngine:
    label: str
    llm: LLM
    named: NamedConfig

    def prefill(self, ids: list[int]) -> Any:
        return self.llm.prefill(ids, self.named.config), ids

    def decode(self, state: Any, count: int) -> list[int]:
        result, ids = state
        completion = self.llm.complete(
            result, ids, prefill=self.named.config, sampling=GREEDY, max_tokens=count, ignore_eos=True
        )
        return completion.token_ids


class TransformersEngine:
    label = TRANSFORMERS

    def __init__(self, directory: Path) -> None:
        import transformers

        self.model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()

    @torch.inference_mode()
    def prefill(self, ids: list[int]) -> Any:
        return self.model(torch.tensor([ids]), use_cache=True, logits_to_keep=1)

    @torch.inference_mode()
    def decode(self, state: Any, count: int) -> list[int]:
        tokens = []
        for _ in range(count):
            token = int(state.logits[0, -1].argmax())
            tokens.append(token)
            state = self.model(
                torch.tensor([[token]]),
                past_key_values=state.past_key_values,
                use_cache=True,
                logits_to_keep=1,
            )
        return tokens


class LlamaCppEngine:
    def __init__(self, gguf: Path, context: int, threads: int) -> None:
        import llama_cpp

        self._llama_cpp = llama_cpp
        self.label = f"{LLAMA_CPP} ({gguf.name})"
        self.model = llama_cpp.Llama(
            model_path=str(gguf), n_ctx=context, n_threads=threads, n_threads_batch=threads, verbose=False
        )

    def prefill(self, ids: list[int]) -> Any:
        self.model.reset()
        self.model.eval(ids)

    def decode(self, state: Any, count: int) -> list[int]:
        tokens = []
        for _ in range(count):
            logits = self._llama_cpp.llama_get_logits_ith(self.model.ctx, -1)
            token = int(numpy.ctypeslib.as_array(logits, shape=(self.model.n_vocab(),)).argmax())
            tokens.append(token)
            self.model.eval([token])
        return tokens


def parser() -> argparse.ArgumentParser:
    p = tool_parser(TOOL, __doc__)
    p.add_argument("--lengths", default="512,2048,8192", help="prompt tokens (default: %(default)s)")
    p.add_argument("--decode-tokens", type=int, default=64, help="tokens generated (default: %(default)s)")
    p.add_argument(
        "--engines", default=",".join(ENGINES), help="engines to run, comma list (default: %(default)s)"
    )
    p.add_argument(
        "--weight-dtypes", default="float32,float16", help="our engine's weight dtypes (default: %(default)s)"
    )
    add_config_options(p, default="full,imdc:snapkv:1024")
    p.add_argument(
        "--decode-memory", type=int, help="memory kept while decoding by bounded configs (default: their M)"
    )
    p.add_argument("--model", metavar="DIR", help="checkpoint directory (default: the default model)")
    p.add_argument(
        "--gguf", metavar="FILE", help="GGUF for llama.cpp (default: the default model's, without --model)"
    )
    p.add_argument(
        "--threads", type=int, default=os.cpu_count(), help="llama.cpp threads (default: all cores)"
    )
    p.add_argument("--repeat", type=int, default=1, help="timed runs after one warm-up; the median counts")
    add_output_options(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run_main(lambda: _run(args, argv), debug=args.debug)


def _run(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    lengths = parse_list(args.lengths, int, "--lengths")
    chosen = parse_list(args.engines, str, "--engines")
    unknown = [name for name in chosen if name not in ENGINES]
    if unknown:
        raise ToolError(f"unknown engine {unknown[0]!r}; known: {', '.join(ENGINES)}")
    if args.decode_tokens < 1:
        raise ToolError(f"--decode-tokens must be at least 1, got {args.decode_tokens}")
    notes: list[str] = []
    engines = _our_engines(args) if "ours" in chosen else []
    reference = engines[0].llm if engines else load(args.model, dtype="float32", device="cpu")
    if "transformers" in chosen:
        engines += _optional(lambda: TransformersEngine(reference.path), "transformers", "test", notes)
    if "llama.cpp" in chosen:
        gguf = _gguf(args.gguf, args.model, notes)
        context = max(lengths) + args.decode_tokens + 8
        if gguf is not None:
            llama_cpp = _optional(
                lambda: LlamaCppEngine(gguf, context, args.threads), "llama_cpp", "llamacpp", notes
            )
            if llama_cpp:
                notes.append(
                    f"llama.cpp runs its GGUF's own weights ({gguf.name}, quantized as shipped) and "
                    "allocates its whole context when it loads, so its 'run MiB' is near zero"
                )
            engines += llama_cpp
    settings = {
        "lengths": lengths,
        "decode_tokens": args.decode_tokens,
        "engines": [engine.label for engine in engines],
        "repeat": args.repeat,
        "threads": args.threads,
        "torch_threads": torch.get_num_threads(),
        "window": reference.config.max_position_embeddings,
        **describe(reference),
    }
    report = start_report(TOOL, argv, "cpu", settings)
    report["notes"] += notes
    prompt = corpus_samples(reference.tokenizer, max(lengths), 1)[0]
    rows = []
    with tqdm(total=len(lengths) * len(engines), desc=TOOL, unit="run") as bar:
        for length in lengths:
            for engine in engines:
                rows.append(_measure(engine, prompt[:length], args.decode_tokens, args.repeat))
                bar.update()
    _compare(rows)
    report["rows"] = rows
    beyond = [length for length in lengths if length > settings["window"]]
    if beyond:
        report["notes"].append(
            f"prompts of {', '.join(map(str, beyond))} tokens exceed the model's trained window of "
            f"{settings['window']}: full caches still run (their speed is measured) but their answers are "
            "meaningless there; bounded memories with compact positions stay inside the window"
        )
    publish(report, tables, json_path=args.json, plot_path=args.plot, draw=draw)
    return 0


def _our_engines(args: argparse.Namespace) -> list[OurEngine]:
    engines = []
    for weight_dtype in parse_list(args.weight_dtypes, str, "--weight-dtypes"):
        llm = load(args.model, dtype="float32", weight_dtype=weight_dtype, device="cpu")
        for named in configs_from_args(args):
            if named.bounded:
                named = with_options(named, decode_memory=args.decode_memory or named.config.memory)
            weights = WEIGHT_LABELS.get(weight_dtype, weight_dtype)
            engines.append(OurEngine(f"ours {weights} {named.label}", llm, named))
    return engines


def _optional(build, module: str, extra: str, notes: list[str]) -> list[Engine]:
    """``[build()]``, or nothing and a note when ``module`` is not installed."""
    try:
        return [build()]
    except ImportError:
        notes.append(f"skipped {module}: not installed (pip install -e '.[{extra}]')")
        return []


def _gguf(given: str | None, model: str | None, notes: list[str]) -> Path | None:
    if given is not None:
        path = Path(given)
        if not path.is_file():
            raise FileNotFoundError(f"--gguf {given}: no such file")
        return path
    if model is not None:
        notes.append("skipped llama.cpp: give --gguf with --model (the GGUF of the same weights)")
        return None
    from engine.default_model import default_gguf_path

    return default_gguf_path()


def _measure(engine: Engine, ids: list[int], decode_tokens: int, repeat: int) -> dict[str, Any]:
    generated: list[int] = []

    def once() -> dict[str, Timing]:
        with Stopwatch("cpu") as prefill:
            state = engine.prefill(ids)
        with Stopwatch("cpu") as decode:
            generated[:] = engine.decode(state, decode_tokens)
        return {"prefill": prefill.timing, "decode": decode.timing}

    timings = repeated(once, repeat)
    return {
        "engine": engine.label,
        "length": len(ids),
        "prefill_seconds": timings["prefill"].seconds,
        "decode_seconds": timings["decode"].seconds,
        "prefill_tok_s": len(ids) / timings["prefill"].seconds,
        "decode_tok_s": decode_tokens / timings["decode"].seconds,
        "prefill_added_bytes": timings["prefill"].added_bytes,
        "decode_added_bytes": timings["decode"].added_bytes,
        "tokens": list(generated),
    }


def _compare(rows: list[dict[str, Any]]) -> None:
    """Speed ratios to transformers at the same length, and how many leading generated tokens agree."""
    for row in rows:
        peer = next((r for r in rows if r["engine"] == TRANSFORMERS and r["length"] == row["length"]), None)
        row["prefill_vs_transformers"] = ratio(row["prefill_tok_s"], peer and peer["prefill_tok_s"])
        row["decode_vs_transformers"] = ratio(row["decode_tok_s"], peer and peer["decode_tok_s"])
        row["agrees_with_transformers"] = (
            None if peer is None else _common_prefix(row["tokens"], peer["tokens"])
        )


def _common_prefix(first: list[int], second: list[int]) -> int:
    count = 0
    for a, b in zip(first, second, strict=False):
        if a != b:
            break
        count += 1
    return count


def tables(report: dict[str, Any]) -> list[Table]:
    settings, rows = report["settings"], report["rows"]
    lengths, engines = settings["lengths"], settings["engines"]

    def cell(engine: str, length: int, key: str) -> str | None:
        row = next((r for r in rows if (r["engine"], r["length"]) == (engine, length)), None)
        if row is None:
            return None
        speed, versus = row[f"{key}_tok_s"], row[f"{key}_vs_transformers"]
        return f"{speed:.0f}" if versus is None else f"{speed:.0f} (×{versus:.2f})"

    columns = ["engine", *[f"L={length}" for length in lengths]]
    where = f"{settings['model']}, {report['machine']['cores']} cores"
    speed_tables = [
        Table(
            f"{name} tokens/s by prompt length ({where}; ×: ratio to {TRANSFORMERS})",
            columns,
            [[engine] + [cell(engine, length, key) for length in lengths] for engine in engines],
        )
        for name, key in (("Prefill", "prefill"), ("Decode", "decode"))
    ]
    detail = Table(
        f"Per run: time, memory added, and agreement with {TRANSFORMERS} "
        f"({settings['decode_tokens']} greedy tokens)",
        ["engine", "L", "prefill s", "decode s", "prefill run MiB", "tokens equal to transformers'"],
        [
            [
                row["engine"],
                row["length"],
                row["prefill_seconds"],
                row["decode_seconds"],
                row["prefill_added_bytes"] / MIB,
                row["agrees_with_transformers"],
            ]
            for row in rows
        ],
    )
    return [*speed_tables, detail]


def draw(pyplot, report: dict[str, Any]):
    settings, rows = report["settings"], report["rows"]
    figure, axis = pyplot.subplots(figsize=(7, 4.5))
    for engine in settings["engines"]:
        points = sorted((r["length"], r["decode_tok_s"]) for r in rows if r["engine"] == engine)
        axis.plot(*zip(*points, strict=True), marker="o", label=engine)
    axis.set_xscale("log", base=2)
    axis.set_xticks(settings["lengths"], [str(length) for length in settings["lengths"]])
    axis.minorticks_off()
    axis.set_xlabel("prompt tokens")
    axis.set_ylabel("decode tokens/s")
    axis.set_title(f"decode speed after the prompt ({settings['model']})")
    axis.legend(fontsize=7)
    return figure


if __name__ == "__main__":
    sys.exit(main())
