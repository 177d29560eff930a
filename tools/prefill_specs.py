"""Prefill configurations named on the command line: ``full`` or ``SCHEDULE:POLICY:M[:C][:KEY=VALUE...]``.

``imdc:snapkv:256`` is IMDC with SnapKV scores, memory M=256 and chunk C (default: ``--chunk``, else
M, the paper's c=M); ``fixed:streaming:1024:512`` gives C explicitly; ``imdc:snapkv:256:kernel=9``
passes a policy option to this config alone (``--policy-arg`` passes one to every config); ``full``
is one full-attention step with no compression.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import policies
import schedules
from engine.chat import PLUGIN_HELP
from engine.cli import parse_options
from engine.prefill import PrefillConfig
from engine.registry import load_plugin
from tools.report import ToolError

FULL = "full"


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
    if text == FULL:
        return NamedConfig(FULL, PrefillConfig())
    parts = text.split(":")
    numbers = [part for part in parts[2:] if "=" not in part]
    own = [part for part in parts[2:] if "=" in part]
    if len(parts) < 3 or len(numbers) not in (1, 2) or parts[2 + len(numbers) :] != own:
        raise ToolError(
            f"config {text!r} is not 'full' or SCHEDULE:POLICY:M[:C][:KEY=VALUE...], e.g. imdc:snapkv:256"
        )
    schedule, policy = parts[0], parts[1]
    try:
        memory, *rest = (int(number) for number in numbers)
    except ValueError:
        raise ToolError(f"config {text!r}: M and C must be whole numbers of tokens") from None
    size = rest[0] if rest else chunk or memory
    options = {**(policy_args or {}), **parse_options(own, f"config {text!r}")}
    try:
        config = PrefillConfig(
            schedule=schedule, policy=policy, memory=memory, chunk=size, policy_args=options
        )
    except ValueError as error:
        raise ToolError(f"config {text!r}: {error}") from None
    return NamedConfig(":".join([schedule, policy, str(memory), str(size), *own]), config)


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


def configs_from_args(args: argparse.Namespace) -> list[NamedConfig]:
    """The configs of ``--configs``, after importing the ``--plugin`` modules that may define them."""
    for module in args.plugin:
        load_plugin(module)
    return parse_specs(args.configs, chunk=args.chunk, policy_args=policy_args_of(args.policy_arg))


def policy_args_of(pairs: Sequence[str]) -> dict[str, Any]:
    return parse_options(pairs, "--policy-arg")
