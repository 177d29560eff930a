"""Pass-key retrieval: can the model repeat a 5-digit key hidden at some depth of a long prompt?

    python -m tools.eval_passkey --lengths 1500,4000,8000,16000 --depths 0.1,0.5,0.9 --keys 5 \\
        --configs full,imdc:snapkv:256 --query-aware --policy-arg kernel=9

The prompt is one user message: an instruction, a haystack of filler sentences with the needle
"The pass key is KEY. Remember it. KEY is the pass key." between two of them, then the question.
An answer is a hit when it contains the key. With ``--query-aware`` the question's tokens are the
policies' observation window (``PrefillConfig.query_window``), so compression keeps what the
question looks at; without it the policies must guess what a later question will need.
"""

from __future__ import annotations

import argparse
import functools
import random
import re
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from engine.cli import run_main
from engine.generate import GREEDY
from engine.llm import LLM
from engine.tokenizer import Tokenizer
from tools.longctx import LENGTH_TOLERANCE, haystack, passkey
from tools.longctx.passkey import INTRO, KEY_DIGITS, NEEDLE, REPEAT_SENTENCES
from tools.measure import Stopwatch
from tools.prefill_specs import FULL, NamedConfig, add_config_options, configs_from_args, with_options
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

TOOL = "eval_passkey"
QUESTION = "\n\n" + passkey.QUESTION
FILLERS = ("repeat", "prose")


@dataclass(frozen=True)
class PasskeyCase:
    ids: list[int]
    key: str
    question_tokens: int  # from the start of the question to the end of the prompt


def passkey_case(
    tokenizer: Tokenizer, length: int, depth: float, key: str, *, filler: str = "repeat"
) -> PasskeyCase:
    """A chat prompt of ``length`` tokens (within 2%) hiding ``key`` at ``depth`` (0: first, 1: last)."""
    if not 0.0 <= depth <= 1.0:
        raise ToolError(f"depth must be a fraction between 0 and 1, got {depth}")
    if filler not in FILLERS:
        raise ToolError(f"unknown filler {filler!r}; use one of {', '.join(FILLERS)}")
    words = filler_words(filler)

    def messages(count: int) -> list[dict[str, str]]:
        taken = [words[i % len(words)] for i in range(count)]
        # The needle goes between two sentences: at the sentence start nearest to the depth.
        starts = [0] + [i + 1 for i, (_, ends_sentence) in enumerate(taken) if ends_sentence]
        at = min(starts, key=lambda start: abs(start - depth * count))
        text = [word for word, _ in taken]
        haystack = "".join(text[:at]) + NEEDLE.format(key=key) + "".join(text[at:])
        # No trailing space before the question: a space would merge with its newlines into one
        # token, and the question's first token would then straddle the haystack's end.
        return [{"role": "user", "content": INTRO + haystack.rstrip() + QUESTION}]

    def tokens(count: int) -> int:
        return len(tokenizer.encode_chat(messages(count)))

    bare = tokens(0)
    if bare > length * (1 + LENGTH_TOLERANCE):
        raise ToolError(f"a pass-key prompt needs at least {bare} tokens with this tokenizer; got {length}")
    probe = 256
    per_word = max(0.5, (tokens(probe) - bare) / probe)
    count = max(0, round((length - bare) / per_word))
    for _ in range(8):  # token counts are nearly additive: a few corrections converge
        step = round((length - tokens(count)) / per_word)
        if step == 0:
            break
        count = max(0, count + step)
    rendered_messages = messages(count)
    ids = tokenizer.encode_chat(rendered_messages)
    if abs(len(ids) - length) > LENGTH_TOLERANCE * length:
        raise ToolError(f"could not build a {length}-token pass-key prompt (got {len(ids)} tokens)")
    rendered = tokenizer.render_chat(rendered_messages)
    prefix = rendered[: rendered.rindex(QUESTION)]
    return PasskeyCase(ids, key, len(ids) - len(tokenizer.encode_rendered(prefix)))


@functools.cache
def filler_words(filler: str) -> tuple[tuple[str, bool], ...]:
    """The filler as (word with its trailing space, whether it ends a sentence), in order."""
    sentences = REPEAT_SENTENCES if filler == "repeat" else haystack.sentences("pydoc")
    words = []
    for sentence in sentences:
        parts = re.findall(r"\S+\s*", sentence)
        words += [(part, index == len(parts) - 1) for index, part in enumerate(parts)]
    return tuple(words)


def passkeys(seed: int, length: int, depth: float, count: int) -> list[str]:
    """``count`` distinct 5-digit keys, the same for the same (seed, length, depth) on every machine."""
    rng = random.Random(f"passkey-{seed}-{length}-{depth}")
    low = 10 ** (KEY_DIGITS - 1)
    return [str(key) for key in rng.sample(range(low, 10 * low), count)]


def parser() -> argparse.ArgumentParser:
    p = tool_parser(TOOL, __doc__)
    p.add_argument(
        "--lengths", default="1500,4000,8000", help="prompt tokens, comma list (default: %(default)s)"
    )
    p.add_argument("--depths", default="0.1,0.5,0.9", help="needle depths (default: %(default)s)")
    p.add_argument(
        "--keys", type=int, default=5, help="random keys per (length, depth) (default: %(default)s)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the keys (default: %(default)s)")
    add_config_options(p, default="full,fixed:snapkv:256,im:snapkv:256,imdc:snapkv:256")
    p.add_argument(
        "--query-aware", action="store_true", help="compress with the question's attention (query_window)"
    )
    p.add_argument("--filler", choices=FILLERS, default="repeat", help="haystack text (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=12, help="answer tokens, greedy (default: %(default)s)")
    add_model_options(p, shapes=False)
    add_output_options(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run_main(lambda: _run(args, argv), debug=args.debug)


def _run(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    lengths = parse_list(args.lengths, int, "--lengths")
    depths = parse_list(args.depths, float, "--depths")
    if args.keys < 1:
        raise ToolError(f"--keys must be at least 1, got {args.keys}")
    configs = configs_from_args(args)
    llm = load_from_args(args)
    settings = {
        "lengths": lengths,
        "depths": depths,
        "keys": args.keys,
        "seed": args.seed,
        "configs": [named.label for named in configs],
        "query_aware": args.query_aware,
        "filler": args.filler,
        "max_tokens": args.max_tokens,
        "window": llm.config.max_position_embeddings,
        **describe(llm),
    }
    report = start_report(TOOL, argv, llm.device, settings)
    cases = [
        (length, depth, passkey_case(llm.tokenizer, length, depth, key, filler=args.filler))
        for length in lengths
        for depth in depths
        for key in passkeys(args.seed, length, depth, args.keys)
    ]
    records = []
    with tqdm(total=len(configs) * len(cases), desc=TOOL, unit="case") as bar:
        for named in configs:
            for length, depth, case in cases:
                records.append(_attempt(llm, named, case, length, depth, args))
                bar.update()
    report["records"] = records
    beyond = [length for length in lengths if length > settings["window"]]
    if beyond:
        report["notes"].append(
            f"lengths {', '.join(map(str, beyond))} exceed the model's trained window of "
            f"{settings['window']} tokens: full attention is expected to fail there, bounded memories "
            "(compact positions) keep every position inside it"
        )
    publish(report, tables, json_path=args.json, plot_path=args.plot, draw=draw)
    return 0


def _attempt(
    llm: LLM, named: NamedConfig, case: PasskeyCase, length: int, depth: float, args: argparse.Namespace
) -> dict[str, Any]:
    if args.query_aware:
        named = with_options(named, query_window=case.question_tokens)
    with Stopwatch(llm.device) as watch:
        result = llm.prefill(case.ids, named.config)
    answer = llm.complete(result, case.ids, prefill=named.config, sampling=GREEDY, max_tokens=args.max_tokens)
    return {
        "config": named.label,
        "length": length,
        "depth": depth,
        "key": case.key,
        "prompt_tokens": len(case.ids),
        "question_tokens": case.question_tokens,
        "answer": answer.text,
        "hit": case.key in answer.text,
        "prefill_seconds": watch.timing.seconds,
        "peak_bytes": watch.timing.peak_bytes,
        "added_bytes": watch.timing.added_bytes,
    }


def select(records: list[dict[str, Any]], **match: object) -> list[dict[str, Any]]:
    return [r for r in records if all(r[key] == value for key, value in match.items())]


def _hits(records: list[dict[str, Any]]) -> str:
    return f"{sum(r['hit'] for r in records)}/{len(records)}"


def tables(report: dict[str, Any]) -> list[Table]:
    settings, records = report["settings"], report["records"]
    configs, lengths, depths = settings["configs"], settings["lengths"], settings["depths"]

    def pick(config: str, **match: object) -> list[dict[str, Any]]:
        return select(records, config=config, **match)

    aware = "query-aware" if settings["query_aware"] else "question-agnostic"
    where = f"{settings['model']}, {settings['filler']} filler, {aware} compression"
    accuracy = Table(
        f"Pass-key hits by prompt length ({where})",
        ["config", "query-aware", *[f"L={length}" for length in lengths], "all"],
        [
            [config, "yes" if settings["query_aware"] and config != FULL else "no"]
            + [_hits(pick(config, length=length)) for length in lengths]
            + [_hits(pick(config))]
            for config in configs
        ],
    )
    by_depth = Table(
        f"Pass-key hits by needle depth, all lengths together ({where})",
        ["config", *[f"depth {depth:g}" for depth in depths]],
        [[config] + [_hits(pick(config, depth=depth)) for depth in depths] for config in configs],
    )
    cost = Table(
        "Prefill cost per config (mean over its cases)",
        ["config", *[f"prefill s, L={length}" for length in lengths], "peak GiB", "run MiB"],
        [
            [config]
            + [
                statistics.mean(r["prefill_seconds"] for r in pick(config, length=length))
                for length in lengths
            ]
            + [
                statistics.mean(r["peak_bytes"] for r in pick(config)) / GIB,
                statistics.mean(r["added_bytes"] for r in pick(config)) / MIB,
            ]
            for config in configs
        ],
    )
    return [accuracy, by_depth, cost]


def draw(pyplot, report: dict[str, Any]):
    settings, records = report["settings"], report["records"]
    configs, lengths, depths = settings["configs"], settings["lengths"], settings["depths"]
    figure, axes = pyplot.subplots(
        1, len(configs), figsize=(3.2 * len(configs) + 1, 3.2), squeeze=False, sharey=True
    )
    for axis, config in zip(axes[0], configs, strict=True):
        grid = []
        for depth in depths:
            row = []
            for length in lengths:
                cell = [
                    r["hit"]
                    for r in records
                    if (r["config"], r["length"], r["depth"]) == (config, length, depth)
                ]
                row.append(sum(cell) / len(cell))
            grid.append(row)
        image = axis.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
        axis.set_xticks(range(len(lengths)), [str(length) for length in lengths], rotation=45)
        axis.set_yticks(range(len(depths)), [f"{depth:g}" for depth in depths])
        axis.set_title(config, fontsize=9)
        axis.set_xlabel("prompt tokens")
    axes[0][0].set_ylabel("needle depth")
    figure.colorbar(image, ax=axes[0].tolist(), label="hit rate")
    aware = "query-aware" if settings["query_aware"] else "question-agnostic"
    figure.suptitle(f"pass-key retrieval ({aware})")
    return figure


if __name__ == "__main__":
    sys.exit(main())
