"""The command-line options the chat and the server share: the model, sampling, and the prefill.

Each group is added to a parser by one function and read back by one function, so ``python -m
engine.chat`` and ``python -m engine.serve`` take the same flags with the same meaning.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping
from pathlib import Path

import backends
from engine.cli import parse_options, parse_size
from engine.generate import Sampling
from engine.llm import LLM, load
from engine.pod import OPTIONS as POD_OPTIONS
from engine.prefill import FULL_SCHEDULE, NO_POLICY, PrefillConfig
from engine.reform import Reform
from engine.registry import load_plugin

REFORM_OPTIONS = [field.name for field in dataclasses.fields(Reform)]
CLI_NAMES = {
    "memory": "--memory", "memory_bytes": "--memory-bytes", "chunk": "--chunk", "policy": "--policy",
    "schedule": "--schedule",
}  # fmt: skip
DEFAULT_BUDGET = 1024  # tokens of --memory and --chunk when a policy is named without them
FLOAT16_SPEEDUP = "1.5-2.7x faster CPU decode, logits within ~0.04 (docs/RESULTS.md)"
PLUGIN_HELP = "import a module (dotted name, or a .py file) that registers policies, schedules or backends"


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", help="checkpoint directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--backend", default="auto", help=f"attention backend: {', '.join(backends.available())}")
    p.add_argument("--dtype", help="float32, float16 or bfloat16 (default: the checkpoint's)")
    p.add_argument("--weight-dtype", help=f"store weights narrower: float16 is {FLOAT16_SPEEDUP}")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--chat-template-file", help="a Jinja chat template replacing the checkpoint's")


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temp", type=float, default=0.8, help="temperature (0: greedy)")
    p.add_argument("--top-k", type=int, default=40, help="top-k sampling (0: off)")
    p.add_argument("--top-p", type=float, default=0.95, help="top-p sampling (1: off)")
    p.add_argument("--min-p", type=float, default=0.05, help="min-p sampling (0: off)")
    p.add_argument("--repeat-penalty", type=float, default=1.0, help="repetition penalty (1: off)")
    p.add_argument("--repeat-last-n", type=int, default=64, help="tokens the repetition penalty looks back")
    p.add_argument("-s", "--seed", type=int, default=-1, help="sampling seed (-1: random)")


def add_prefill_options(p: argparse.ArgumentParser) -> None:
    long = p.add_argument_group("long context: chunked prefill into a compressed memory")
    long.add_argument(
        "--schedule",
        help="full, fixed, im, imdc, or a plugin's (default: imdc when --policy is given, else full)",
    )
    long.add_argument(
        "--policy", help="none, streaming, snapkv, h2o, ..., or a plugin's (default: none; h2o with --reform)"
    )
    long.add_argument(
        "--memory", type=int, help=f"memory budget M in tokens, sinks excluded (default {DEFAULT_BUDGET})"
    )
    long.add_argument(
        "--memory-bytes",
        type=parse_size,
        metavar="SIZE",
        help="the memory budget in bytes instead (64MiB, 1.5GB): as many tokens as fit, at --kv-bits",
    )
    long.add_argument("--chunk", type=int, help=f"chunk size c in tokens (default {DEFAULT_BUDGET})")
    long.add_argument("--sinks", type=int, default=4, help="first tokens never evicted")
    long.add_argument(
        "--kv-bits", type=int, help="store the memory's keys and values quantized to 8, 4, 3 or 2 bits"
    )
    long.add_argument("--positions", default="compact", help="compact (renumber each step) or original")
    long.add_argument(
        "--decode-memory", type=int, help="also keep the memory within this budget while generating"
    )
    long.add_argument("--policy-arg", action="append", default=[], metavar="KEY=VALUE", help="policy option")
    long.add_argument(
        "--schedule-arg", action="append", default=[], metavar="KEY=VALUE", help="e.g. shape=sqrt"
    )
    long.add_argument("--plugin", action="append", default=[], metavar="MODULE", help=PLUGIN_HELP)
    pod = p.add_argument_group(
        "POD: distant keys shared across blocks of layers (full attention's memory, training-free)"
    )
    pod.add_argument("--pod", action="store_true", help="share distant keys as POD does")
    pod.add_argument(
        "--pod-arg", action="append", default=[], metavar="KEY=VALUE",
        help=f"one of {', '.join(POD_OPTIONS)} (e.g. threshold=0.7)",
    )  # fmt: skip
    reform = p.add_argument_group(
        "REFORM: read a document with the memory above, answer each question from an exact cache "
        "recomputed over the document tokens gathered for it"
    )
    reform.add_argument("--reform", action="store_true", help="answer by REFORM")
    reform.add_argument(
        "--reform-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"one of {', '.join(REFORM_OPTIONS)} (e.g. gather=2048)",
    )


def prefill_config(args: argparse.Namespace) -> PrefillConfig:
    for module in args.plugin:
        load_plugin(module)
    if args.reform_arg and not args.reform:
        raise ValueError("--reform-arg sets REFORM's options: add --reform")
    if args.pod_arg and not args.pod:
        raise ValueError("--pod-arg sets POD's options: add --pod")
    return build_prefill(
        schedule=args.schedule,
        policy=args.policy,
        memory=args.memory,
        memory_bytes=args.memory_bytes,
        chunk=args.chunk,
        sinks=args.sinks,
        positions=args.positions,
        policy_args=parse_options(args.policy_arg, "--policy-arg"),
        schedule_args=parse_options(args.schedule_arg, "--schedule-arg"),
        decode_memory=args.decode_memory,
        kv_bits=args.kv_bits,
        reform=parse_options(args.reform_arg, "--reform-arg") if args.reform else None,
        pod=parse_options(args.pod_arg, "--pod-arg") if args.pod else None,
        names=CLI_NAMES,
    )


def build_prefill(
    *,
    memory: int | None = None,
    chunk: int | None = None,
    reform: Mapping[str, object] | None = None,
    names: Mapping[str, str] | None = None,
    **fields: object,
) -> PrefillConfig:
    """A PrefillConfig from what a user gave (None: not given), with the defaults and the refusals of
    the command line: a budget or a chunk nothing would use means the user expected compression."""
    names = names or CLI_NAMES
    memory_bytes = fields.get("memory_bytes")
    if memory is not None and memory_bytes is not None:
        both = f"{names['memory']} and {names['memory_bytes']}"
        raise ValueError(f"{both} both set the memory budget: give one")
    config = PrefillConfig(
        memory=DEFAULT_BUDGET if memory is None else memory,
        chunk=DEFAULT_BUDGET if chunk is None else chunk,
        reform=None if reform is None else reform_options(reform),
        **{key: value for key, value in fields.items() if value is not None},
    )
    if config.policy == NO_POLICY and config.decode_memory is None:
        if memory is not None or memory_bytes is not None:
            given = f"{names['memory']} {memory}" if memory is not None else names["memory_bytes"]
            raise ValueError(
                f"{given} sets a compression budget, but no {names['policy']} chooses "
                f"which tokens to keep: add one, e.g. {names['policy']} snapkv (or streaming, h2o, ...)"
            )
        if chunk is not None and config.schedule == FULL_SCHEDULE:
            raise ValueError(
                f"{names['chunk']} {chunk} splits the prompt only with a chunked {names['schedule']} "
                f"(fixed, im, imdc) or a {names['policy']} (then imdc)"
            )
    return config


def reform_options(options: Mapping[str, object]) -> Reform:
    unknown = [key for key in options if key not in REFORM_OPTIONS]
    if unknown:
        raise ValueError(f"REFORM has no option {', '.join(unknown)}; options: {', '.join(REFORM_OPTIONS)}")
    return Reform(**options)


def sampling(args: argparse.Namespace) -> Sampling:
    return Sampling(
        temperature=args.temp,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repeat_penalty=args.repeat_penalty,
        repeat_last_n=args.repeat_last_n,
        seed=None if args.seed < 0 else args.seed,
    )


def load_model(args: argparse.Namespace) -> LLM:
    """The LLM the model options name."""
    template = Path(args.chat_template_file).read_text(encoding="utf-8") if args.chat_template_file else None
    return load(
        args.model,
        backend=args.backend,
        dtype=args.dtype,
        weight_dtype=args.weight_dtype,
        device=args.device,
        chat_template=template,
    )
