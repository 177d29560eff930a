"""Prefill configs named on the command line: ``full`` or ``[reform:]SCHEDULE:POLICY:M[:C][:KEY=VALUE...]``.

``imdc:snapkv:256`` is IMDC with SnapKV scores, memory M=256 and chunk C (default: ``--chunk``, else
M, the paper's c=M); ``fixed:streaming:1024:512`` gives C explicitly; ``imdc:snapkv:256:kernel=9``
passes a policy option to this config alone (``--policy-arg`` passes one to every config); ``full``
is one full-attention step with no compression. ``reform:imdc:h2o:256`` reads that way and answers
by REFORM (``engine.reform``); its options (``gather=2048``, ``pool``, ``prefix``, ``suffix``, ...)
sit among the policy's, as does ``kv_bits=4``, which stores the memory quantized
(``engine.kv_quant``; ``full:kv_bits=4`` for full attention). ``full:pod=0.7`` shares distant keys
across layers as POD does at threshold 0.7 (``pod_initial=``, ``pod_recent=``, ``pod_adapt=1``;
``engine.pod``).
M may be a size instead of tokens:
``fixed:mikv:64MiB:1024`` keeps what fits in 64 MiB (``--memory-bytes``; C must then be given).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import policies
import schedules
from engine.cli import parse_options, parse_size
from engine.options import PLUGIN_HELP, POD_OPTIONS, REFORM_OPTIONS, reform_options
from engine.prefill import PrefillConfig
from engine.registry import load_plugin
from tools.report import ToolError

FULL = "full"
REFORM = "reform"
MEMORY_OPTIONS = ("kv_bits",)  # options of the memory itself, not of the policy
POD_PREFIX = "pod"  # pod=THRESHOLD, pod_initial=, pod_recent=, pod_adapt=: POD's options (``engine.pod``)
POD_SPEC_OPTIONS = [POD_PREFIX if name == "threshold" else f"{POD_PREFIX}_{name}" for name in POD_OPTIONS]
SIZE = re.compile(r"[\d.]+\s*[KMG]i?B", re.IGNORECASE)  # an M in bytes: 64MiB, 1.5GB


@dataclass(frozen=True)
class NamedConfig:
    label: str
    config: PrefillConfig

    @property
    def bounded(self) -> bool:
        """Whether the memory stays within a budget (everything but ``full``)."""
        return self.config.schedule != FULL


def parse_spec(
    text: str, *, chunk: int | None = None, policy_args: Mapping[str, Any] | None = None
) -> NamedConfig:
    text = text.strip()
    parts = text.split(":")
    if parts[0] == FULL and all("=" in part for part in parts[1:]):
        memory_options = _memory_options(parse_options(parts[1:], f"config {text!r}"), text)
        try:
            return NamedConfig(text, PrefillConfig(**memory_options))
        except ValueError as error:
            raise ToolError(f"config {text!r}: {error}") from None
    answering = parts[0] == REFORM
    if answering:
        parts = parts[1:]
    numbers = [part for part in parts[2:] if "=" not in part]
    own = [part for part in parts[2:] if "=" in part]
    if len(parts) < 3 or len(numbers) not in (1, 2) or parts[2 + len(numbers) :] != own:
        raise ToolError(
            f"config {text!r} is not 'full' or SCHEDULE:POLICY:M[:C][:KEY=VALUE...], e.g. imdc:snapkv:256"
        )
    schedule, policy = parts[0], parts[1]
    budget, *chunks = numbers
    memory_bytes = parse_size(budget) if SIZE.fullmatch(budget) else None
    try:
        memory = PrefillConfig.memory if memory_bytes is not None else int(budget)
        rest = [int(number) for number in chunks]
    except ValueError:
        raise ToolError(
            f"config {text!r}: M must be whole tokens or a size like 64MiB, C whole tokens"
        ) from None
    if memory_bytes is not None and not rest and chunk is None:
        raise ToolError(f"config {text!r}: a memory given in bytes needs its chunk C, e.g. {text}:1024")
    size = rest[0] if rest else chunk or memory
    options = {**(policy_args or {}), **parse_options(own, f"config {text!r}")}
    reform_args = {key: options.pop(key) for key in REFORM_OPTIONS if key in options} if answering else {}
    memory_options = _memory_options(options, text)
    try:
        config = PrefillConfig(
            schedule=schedule, policy=policy, memory=memory, chunk=size, policy_args=options,
            reform=reform_options(reform_args) if answering else None, memory_bytes=memory_bytes,
            **memory_options,
        )  # fmt: skip
    except ValueError as error:
        raise ToolError(f"config {text!r}: {error}") from None
    label = ":".join([*([REFORM] if answering else []), schedule, policy, budget, str(size), *own])
    return NamedConfig(label, config)


def _memory_options(options: dict[str, Any], text: str) -> dict[str, Any]:
    """Take the memory's own options (``kv_bits``) out of ``options``; a full config has no others."""
    taken = {key: options.pop(key) for key in MEMORY_OPTIONS if key in options}
    pod = {key: options.pop(key) for key in list(options) if key.split("_")[0] == POD_PREFIX}
    if pod:  # pod=THRESHOLD, pod_recent=N: PodSettings' fields
        taken["pod"] = {key.partition("_")[2] or "threshold": value for key, value in pod.items()}
    if text.split(":")[0] == FULL and options:
        allowed = ", ".join((*MEMORY_OPTIONS, *POD_SPEC_OPTIONS))
        given = ", ".join(options)
        raise ToolError(f"config {text!r}: full attention takes only {allowed}, not {given}")
    return taken


def parse_specs(
    text: str, *, chunk: int | None = None, policy_args: Mapping[str, Any] | None = None
) -> list[NamedConfig]:
    """A comma-separated list of configs (see the module's documentation)."""
    parts = [part for part in text.split(",") if part.strip()]
    named = [parse_spec(part, chunk=chunk, policy_args=policy_args) for part in parts]
    if not named:
        raise ToolError("--configs needs at least one config, e.g. full,imdc:snapkv:256")
    labels = [n.label for n in named]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise ToolError(f"--configs names {', '.join(repeated)} more than once")
    return named


def with_options(named: NamedConfig, **options: Any) -> NamedConfig:
    """The same config with PrefillConfig fields changed (query_window, decode_memory...)."""
    return NamedConfig(named.label, replace(named.config, **options))


def add_config_options(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument(
        "--configs",
        default=default,
        help="comma-separated prefill configs: 'full' or SCHEDULE:POLICY:M[:C][:KEY=VALUE...], e.g. "
        "imdc:snapkv:256 or imdc:snapkv:256:kernel=9 "
        f"(schedules: {', '.join(schedules.available())}; policies: {', '.join(policies.available())}; "
        "default: %(default)s)",
    )
    parser.add_argument("--chunk", type=int, help="chunk C of configs that give none (default: their M)")
    parser.add_argument(
        "--policy-arg", action="append", default=[], metavar="KEY=VALUE", help="policy option, e.g. kernel=9"
    )
    parser.add_argument("--plugin", action="append", default=[], metavar="MODULE", help=PLUGIN_HELP)


def configs_from_args(args: argparse.Namespace, *, reform: bool = False) -> list[NamedConfig]:
    """The configs of ``--configs``, after importing the ``--plugin`` modules that may define them.
    Tools that answer questions (``reform``) also take REFORM configs."""
    for module in args.plugin:
        load_plugin(module)
    named = parse_specs(args.configs, chunk=args.chunk, policy_args=policy_args_of(args.policy_arg))
    answering = [n.label for n in named if n.config.reform is not None]
    if answering and not reform:
        raise ToolError(
            f"{', '.join(answering)}: REFORM answers questions over a document; evaluate it with "
            "tools.eval_longctx (this tool measures prefills)"
        )
    return named


def policy_args_of(pairs: Sequence[str]) -> dict[str, Any]:
    return parse_options(pairs, "--policy-arg")
