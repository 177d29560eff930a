"""Offline measurements of a model's heads, one module per method, run by ``python -m tools.find_heads``.

Each method module has ``NAME`` (its section of the calibration file), ``add_options(parser)``,
``units(args)`` (steps of work, for the progress bar), ``calibrate(llm, args, advance)`` returning its
section, and ``summary(section)`` (one line for the terminal); optionally ``check(args)``, which
refuses its settings before anything runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.llm import LLM
from tools.longctx import Case, prompt_messages


def prompt(llm: LLM, case: Case, question: int = 0) -> tuple[str, list[int]]:
    """The chat prompt of ``case``'s question, rendered, and its token ids."""
    text = llm.tokenizer.render_chat(prompt_messages(case.document, case.questions[question].text))
    return text, llm.tokenizer.encode_rendered(text)


def token_at(llm: LLM, text: str, offset: int) -> int:
    """The index of the token holding character ``offset`` of the rendered ``text`` (to a token)."""
    return len(llm.tokenizer.encode_rendered(text[:offset]))


def fact_tokens(llm: LLM, text: str, facts: Sequence[str]) -> list[int]:
    """The indices of the tokens of ``facts`` (their first occurrence) in the rendered ``text``."""
    tokens: set[int] = set()
    for fact in facts:
        start = text.index(fact.strip())
        tokens.update(range(token_at(llm, text, start), token_at(llm, text, start + len(fact.strip()))))
    return sorted(tokens)


def rotated(llm: LLM, states: torch.Tensor) -> torch.Tensor:
    """Pre-RoPE ``states`` [H, n, D] rotated at positions 0..n-1, in float32."""
    return llm.rope.rotate(states.float(), torch.arange(states.shape[-2], device=states.device))


def per_kv_head(llm: LLM, values: torch.Tensor, reduce: str) -> torch.Tensor:
    """Per-query-head ``values`` [..., Hq] reduced over each KV head's group ("max" or "mean")."""
    grouped = values.unflatten(-1, (llm.config.num_kv_heads, llm.config.group))
    return grouped.amax(dim=-1) if reduce == "max" else grouped.mean(dim=-1)
