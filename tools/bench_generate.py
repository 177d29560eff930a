"""Prefill and decode speed against peers, on the same checkpoint and the same prompt ids.

    python -m tools.bench_generate --lengths 512,2048,8192,16384 --decode-tokens 64

Engines: this one in every ``--weight-dtypes`` format (``float32``; ``float16`` weights with float32
activations; ``bfloat16``; ``int8`` and ``int4`` weights with bfloat16 activations where the CPU has
them; ``gguf``: the GGUF file loaded directly, its quantization kept), each with every ``--configs``
entry (full attention, and a bounded memory that decoding also keeps within M); ``transformers`` in
float32 (one forward with a cache, then a greedy loop over ``past_key_values``); ``llama.cpp``
(llama-cpp-python) on the GGUF file the default model was converted from. Every engine is timed the
same way: the prompt's forward pass, then ``--decode-tokens`` greedy tokens, each fed back one at a
time. Prompts are standard library source (the ``eval_ppl`` corpus). With a bounded memory, decoding
costs the same however long the prompt was; full caches slow down as they grow. Each of our formats
is loaded alone, its weights' bytes and the process's resident memory recorded, and its logits on a
fixed set of prompts compared with float32's (largest and mean difference, and how many of its first
greedy tokens equal float32's).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
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
from engine.peak_memory import current_bytes, release_freed_memory
from engine.prefill import PrefillConfig
from models.quantized import nbytes
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
BF16 = torch.cpu._is_avx512_bf16_supported()  # the packed int8/int4 kernels are fast with bf16 activations
ACTIVATIONS = "bfloat16" if BF16 else "float32"
SHORT = {"bfloat16": "bf16", "float32": "fp32"}[ACTIVATIONS]
# --weight-dtypes entry -> (weight format, activations dtype, label)
FORMATS = {
    "float32": ("float32", "float32", "fp32"),
    "float16": ("float16", "float32", "fp16 weights"),
    "bfloat16": ("bfloat16", "bfloat16", "bf16"),
    "int8": ("int8", ACTIVATIONS, f"int8 weights, {SHORT} activations"),
    "int4": ("int4", ACTIVATIONS, f"int4 weights, {SHORT} activations"),
    "gguf": (None, ACTIVATIONS, "GGUF direct"),
}
ACCURACY_PROMPTS = 2  # prompts of ACCURACY_TOKENS tokens whose logits each format is compared on
ACCURACY_TOKENS = 128


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
        "--weight-dtypes",
        default="float32,bfloat16,int8,int4,gguf",
        help=f"our engine's weight formats: {', '.join(FORMATS)} (default: %(default)s)",
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
    formats = parse_list(args.weight_dtypes, str, "--weight-dtypes") if "ours" in chosen else []
    unknown = [name for name in formats if name not in FORMATS]
    if unknown:
        raise ToolError(f"unknown weight format {unknown[0]!r}; known: {', '.join(FORMATS)}")
    if args.decode_tokens < 1:
        raise ToolError(f"--decode-tokens must be at least 1, got {args.decode_tokens}")
    configs = configs_from_args(args)
    gguf = _gguf(args.gguf, args.model, [])
    if "gguf" in formats and gguf is None:
        raise ToolError("--weight-dtypes gguf needs the GGUF file: give --gguf with --model")
    notes: list[str] = []
    reference = load(args.model, dtype="float32", device="cpu")
    prompt = corpus_samples(reference.tokenizer, max(lengths), 1)[0]
    probes = corpus_samples(reference.tokenizer, ACCURACY_TOKENS, ACCURACY_PROMPTS + 1)[1:]
    reference_logits = [reference.logits(ids) for ids in probes]
    path = reference.path
    runs: list[tuple[str, Any]] = [(form, None) for form in formats]  # ours: loaded when their turn comes
    if "transformers" in chosen:
        runs += [
            (TRANSFORMERS, engine)
            for engine in _optional(lambda: TransformersEngine(path), "transformers", "test", notes)
        ]
    if "llama.cpp" in chosen and gguf is not None:
        context = max(lengths) + args.decode_tokens + 8
        for engine in _optional(
            lambda: LlamaCppEngine(gguf, context, args.threads), "llama_cpp", "llamacpp", notes
        ):
            notes.append(
                f"llama.cpp runs its GGUF's own weights ({gguf.name}, quantized as shipped) and "
                "allocates its whole context when it loads, so its 'run MiB' is near zero"
            )
            runs.append((engine.label, engine))
    labels = [f"ours {FORMATS[form][2]} {named.label}" for form in formats for named in configs]
    labels += [label for label, engine in runs if engine is not None]
    settings = {
        "lengths": lengths,
        "decode_tokens": args.decode_tokens,
        "engines": labels,
        "formats": formats,
        "repeat": args.repeat,
        "threads": args.threads,
        "torch_threads": torch.get_num_threads(),
        "window": reference.config.max_position_embeddings,
        **describe(reference),
    }
    del reference
    report = start_report(TOOL, argv, "cpu", settings)
    report["notes"] += notes
    rows, weights, profiles = [], [], []
    total = (len(formats) * len(configs) + len(runs) - len(formats)) * len(lengths)
    with tqdm(total=total, desc=TOOL, unit="run") as bar:
        for form, peer in runs:
            if peer is not None:
                engines = [peer]
            else:
                llm, loaded = _load_format(args.model, gguf, form)
                weights.append({"format": form, **loaded, **_accuracy(llm, probes, reference_logits)})
                engines = [_ours(llm, form, named, args) for named in configs]
            for engine in engines:
                for length in lengths:
                    rows.append(_measure(engine, prompt[:length], args.decode_tokens, args.repeat))
                    bar.update()
            if peer is None:
                profile = _decode_profile(llm, prompt[: min(lengths)], args.decode_tokens)
                profiles.append({"format": form, **profile})
            engines = llm = None  # release this format before loading the next
    _compare(rows, formats, configs)
    report["rows"], report["weights"], report["profiles"] = rows, weights, profiles
    beyond = [length for length in lengths if length > settings["window"]]
    if beyond:
        report["notes"].append(
            f"prompts of {', '.join(map(str, beyond))} tokens exceed the model's trained window of "
            f"{settings['window']}: full caches still run (their speed is measured) but their answers are "
            "meaningless there; bounded memories with compact positions stay inside the window"
        )
    publish(report, tables, json_path=args.json, plot_path=args.plot, draw=draw)
    return 0


def _load_format(model: str | None, gguf: Path | None, form: str) -> tuple[LLM, dict[str, Any]]:
    """Our engine in weight format ``form``, its weights' bytes and the process's resident memory."""
    weights, activations, _ = FORMATS[form]
    release_freed_memory()
    before = current_bytes(torch.device("cpu"))
    source = gguf if form == "gguf" else model
    llm = load(source, dtype=activations, weight_dtype=weights, device="cpu")
    release_freed_memory()
    return llm, {
        "weights_bytes": nbytes(llm.model),
        "resident_bytes": current_bytes(torch.device("cpu")),
        "loaded_bytes": current_bytes(torch.device("cpu")) - before,
    }


def _ours(llm: LLM, form: str, named: NamedConfig, args: argparse.Namespace) -> OurEngine:
    if named.bounded:
        named = with_options(named, decode_memory=args.decode_memory or named.config.memory)
    return OurEngine(f"ours {FORMATS[form][2]} {named.label}", llm, named)


def _decode_profile(llm: LLM, ids: list[int], count: int) -> dict[str, float]:
    """Where a full-attention decode step's time goes: in the weights' products (every projection and
    the output head), in attention, and everything else (norms, RoPE, the memory, Python)."""
    spent = {"weights": 0.0, "attention": 0.0}

    def timed(function, key):
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spent[key] += time.perf_counter() - started

        return wrapper

    layers = [module for module in llm.model.modules() if hasattr(module, "parts")]
    originals = [(module, module.forward) for module in layers]
    config = PrefillConfig()
    backend = llm.attention_setup(config.build_policy()).backend
    decode = backend.decode
    result = llm.prefill(ids)
    try:
        for module, forward in originals:
            module.forward = timed(forward, "weights")
        backend.decode = timed(decode, "attention")
        started = time.perf_counter()
        llm.complete(result, ids, sampling=GREEDY, max_tokens=count, ignore_eos=True)
        total = time.perf_counter() - started
    finally:
        for module, forward in originals:
            module.forward = forward
        backend.decode = decode
    per_token = {key: 1000 * value / count for key, value in spent.items()}
    return {
        "ms_per_token": 1000 * total / count,
        **per_token,
        "other": 1000 * total / count - sum(per_token.values()),
    }


def _accuracy(llm: LLM, probes: list[list[int]], reference: list[torch.Tensor]) -> dict[str, float]:
    """Largest and mean |logit - float32 logit| over every position of the probe prompts."""
    errors = [(llm.logits(ids) - logits).abs() for ids, logits in zip(probes, reference, strict=True)]
    return {
        "max_logit_error": max(float(error.max()) for error in errors),
        "mean_logit_error": sum(float(error.mean()) for error in errors) / len(errors),
    }


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


def _compare(rows: list[dict[str, Any]], formats: list[str], configs: list[NamedConfig]) -> None:
    """Speed ratios to transformers and to llama.cpp at the same length, and how many leading greedy
    tokens agree with transformers and with our float32 engine under the same config."""
    for row in rows:
        at = [r for r in rows if r["length"] == row["length"]]
        peer = next((r for r in at if r["engine"] == TRANSFORMERS), None)
        cpp = next((r for r in at if r["engine"].startswith(LLAMA_CPP)), None)
        row["prefill_vs_transformers"] = ratio(row["prefill_tok_s"], peer and peer["prefill_tok_s"])
        row["decode_vs_transformers"] = ratio(row["decode_tok_s"], peer and peer["decode_tok_s"])
        row["prefill_vs_llamacpp"] = ratio(row["prefill_tok_s"], cpp and cpp["prefill_tok_s"])
        row["decode_vs_llamacpp"] = ratio(row["decode_tok_s"], cpp and cpp["decode_tok_s"])
        row["agrees_with_transformers"] = (
            None if peer is None else _common_prefix(row["tokens"], peer["tokens"])
        )
        base = next(
            (
                r for r in at for named in configs
                if row["engine"].endswith(f" {named.label}") and r["engine"] == f"ours fp32 {named.label}"
            ),
            None,
        )  # fmt: skip
        row["agrees_with_float32"] = None if base is None else _common_prefix(row["tokens"], base["tokens"])


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
        ratios = [
            f"{name} {row[f'{key}_vs_{peer}']:.2f}"
            for name, peer in (("×tf", "transformers"), ("×cpp", "llamacpp"))
            if row.get(f"{key}_vs_{peer}") is not None
        ]
        speed = row[f"{key}_tok_s"]
        return f"{speed:.0f}" + (f" ({', '.join(ratios)})" if ratios else "")

    columns = ["engine", *[f"L={length}" for length in lengths]]
    where = f"{settings['model']}, {report['machine']['cores']} cores"
    speed_tables = [
        Table(
            f"{name} tokens/s by prompt length ({where}; ×tf: ratio to {TRANSFORMERS}, ×cpp: to llama.cpp)",
            columns,
            [[engine] + [cell(engine, length, key) for length in lengths] for engine in engines],
        )
        for name, key in (("Prefill", "prefill"), ("Decode", "decode"))
    ]
    result = list(speed_tables)
    if report.get("weights"):
        result.append(_weights_table(report))
    if report.get("profiles"):
        result.append(
            Table(
                f"Where a decode step's time goes (ms per token, full attention after {min(lengths)} "
                "prompt tokens)",
                ["format", "step", "weight products", "attention", "everything else"],
                [
                    [FORMATS[p["format"]][2], p["ms_per_token"], p["weights"], p["attention"], p["other"]]
                    for p in report["profiles"]
                ],
            )
        )
    result.append(
        Table(
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
    )
    return result


def _weights_table(report: dict[str, Any]) -> Table:
    settings, rows = report["settings"], report["rows"]
    first = min(settings["lengths"])

    def agreement(form: str) -> str | None:
        engine = f"ours {FORMATS[form][2]} full"
        row = next((r for r in rows if r["length"] == first and r["engine"] == engine), None)
        return None if row is None else f"{row['agrees_with_float32']}/{settings['decode_tokens']}"

    return Table(
        f"Weight formats: bytes, resident memory, and logits against float32 ({ACCURACY_PROMPTS} prompts of "
        f"{ACCURACY_TOKENS} tokens; greedy tokens equal to float32's at L={first}, full attention)",
        ["format", "weights MiB", "resident MiB", "max |Δlogit|", "mean |Δlogit|", "greedy tokens equal"],
        [
            [
                FORMATS[w["format"]][2],
                w["weights_bytes"] / MIB,
                w["resident_bytes"] / MIB,
                w["max_logit_error"],
                w["mean_logit_error"],
                agreement(w["format"]),
            ]
            for w in report["weights"]
        ],
    )


def draw(pyplot, report: dict[str, Any]):
    settings, rows = report["settings"], report["rows"]
    figure, axis = pyplot.subplots(figsize=(7, 4.5))
    colors = pyplot.get_cmap("tab20").colors  # a colour per engine: more engines than the default cycle
    for index, engine in enumerate(settings["engines"]):
        points = sorted((r["length"], r["decode_tok_s"]) for r in rows if r["engine"] == engine)
        bounded = not engine.endswith(" full") and engine.startswith("ours")
        axis.plot(
            *zip(*points, strict=True), marker="o", label=engine, color=colors[index % len(colors)],
            linestyle="--" if bounded else "-",
        )  # fmt: skip
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
