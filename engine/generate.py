"""Sampling and the token loop. Sampler order and semantics follow llama.cpp:
penalties -> top-k -> top-p -> min-p -> temperature -> draw (temperature <= 0 is greedy). The
penalties are llama.cpp's repetition penalty over recent tokens, then OpenAI's presence and frequency
penalties over the tokens generated so far."""

from __future__ import annotations

import collections
import itertools
import math
import random
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.8
    top_k: int = 40  # <= 0: off
    top_p: float = 0.95  # 1: off
    min_p: float = 0.05  # 0: off
    repeat_penalty: float = 1.0  # 1: off
    repeat_last_n: int = 64  # how many recent tokens (prompt included) the penalty looks at
    presence_penalty: float = 0.0  # subtracted once from the logit of every token generated so far
    frequency_penalty: float = 0.0  # subtracted per time a token was generated so far
    seed: int | None = None  # None: a random seed

    def __post_init__(self) -> None:
        for name in (
            "temperature",
            "top_p",
            "min_p",
            "repeat_penalty",
            "presence_penalty",
            "frequency_penalty",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        for name in ("top_k", "repeat_last_n"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be a whole number, got {value!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repeat_penalty <= 0:
            raise ValueError(f"repeat_penalty must be positive, got {self.repeat_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be between -2 and 2, got {getattr(self, name)}")


GREEDY = Sampling(temperature=0.0)


class Sampler:
    def __init__(self, sampling: Sampling) -> None:
        self.sampling = sampling
        self.generator = torch.Generator().manual_seed(
            sampling.seed if sampling.seed is not None else random.randrange(2**63)
        )
        self.generated: collections.Counter[int] = collections.Counter()

    def __call__(self, logits: torch.Tensor, history: Sequence[int]) -> int:
        """Draw the next token from float32 ``logits`` [V] given the tokens so far."""
        token = self._draw(logits, history)
        self.generated[token] += 1
        return token

    def _draw(self, logits: torch.Tensor, history: Sequence[int]) -> int:
        s = self.sampling
        logits = logits.detach().float().cpu()
        if s.repeat_penalty != 1.0 and s.repeat_last_n != 0 and history:
            window = history[-s.repeat_last_n :] if s.repeat_last_n > 0 else history
            logits = penalize_repeats(logits, window, s.repeat_penalty)
        if (s.presence_penalty or s.frequency_penalty) and self.generated:
            tokens = torch.tensor(list(self.generated))
            counts = torch.tensor(list(self.generated.values()), dtype=logits.dtype)
            logits = logits.clone()
            logits[tokens] -= s.presence_penalty + s.frequency_penalty * counts
        if s.temperature <= 0:
            return int(logits.argmax())
        candidates = torch.arange(logits.numel())
        if 0 < s.top_k < logits.numel():
            logits, candidates = logits.topk(s.top_k)
        logits, order = logits.sort(descending=True)
        candidates = candidates[order]
        if s.top_p < 1.0:
            cumulative = logits.softmax(-1).cumsum(-1)
            # Keep the smallest prefix whose mass reaches top_p (always at least one token).
            keep = int((cumulative < s.top_p).sum()) + 1
            logits, candidates = logits[:keep], candidates[:keep]
        if s.min_p > 0.0:
            probs = logits.softmax(-1)
            keep = probs >= s.min_p * probs[0]
            logits, candidates = logits[keep], candidates[keep]
        probs = (logits / s.temperature).softmax(-1)
        return int(candidates[torch.multinomial(probs, 1, generator=self.generator)])


def penalize_repeats(logits: torch.Tensor, recent: Sequence[int], penalty: float) -> torch.Tensor:
    """CTRL-style penalty on each distinct recent token: positive logits divided, negative multiplied."""
    seen = torch.tensor(sorted(set(recent)), dtype=torch.long)
    penalized = logits.clone()
    values = penalized[seen]
    penalized[seen] = torch.where(values > 0, values / penalty, values * penalty)
    return penalized


@dataclass
class Generated:
    token_ids: list[int]
    text: str
    finish_reason: str  # "eos", "stop" (a stop string), "length" or "cancelled"


def generate_tokens(
    step: Callable[[int], torch.Tensor],
    logits: torch.Tensor,
    sampler: Sampler,
    decoder,
    *,
    history: Sequence[int],
    max_tokens: int | None,
    eos_ids: Sequence[int],
    stop: Sequence[str] = (),
    on_text: Callable[[str], None] | None = None,
    cancel: threading.Event | None = None,
) -> Generated:
    """Sample up to ``max_tokens`` tokens (None or negative: no limit), feeding each accepted one
    through ``step`` (token -> logits).

    ``decoder`` is the tokenizer's streaming decoder (``push(id) -> str``, ``flush() -> str``). Text
    that might be the start of a stop string is held back from ``on_text`` until it is decided.
    """
    history = list(history)
    ids: list[int] = []
    text = ""
    emitted = 0
    finish = "length"
    unlimited = max_tokens is None or max_tokens < 0
    for _ in itertools.count() if unlimited else range(max_tokens):
        if cancel is not None and cancel.is_set():
            finish = "cancelled"
            break
        token = sampler(logits, history)
        if token in eos_ids:
            finish = "eos"
            break
        ids.append(token)
        history.append(token)
        # Every accepted token is fed, so the memory always holds exactly the prompt and ``ids``.
        logits = step(token)
        text += decoder.push(token)
        cut = _stop_at(text, stop)
        if cut is not None:
            text, finish = text[:cut], "stop"
            break
        if on_text is not None:
            safe = len(text) - _pending_stop_prefix(text, stop)
            if safe > emitted:
                on_text(text[emitted:safe])
                emitted = safe
    if finish != "stop":
        text += decoder.flush()
    if on_text is not None and len(text) > emitted:
        on_text(text[emitted:])
    return Generated(ids, text, finish)


def _stop_at(text: str, stop: Sequence[str]) -> int | None:
    found = [text.find(s) for s in stop if s and s in text]
    return min(found) if found else None


def _pending_stop_prefix(text: str, stop: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that a stop string starts with."""
    longest = 0
    for s in stop:
        for size in range(min(len(s) - 1, len(text)), longest, -1):
            if s.startswith(text[-size:]):
                longest = size
                break
    return longest
