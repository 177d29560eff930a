"""Aggregation over a long list (RULER's ``cwe`` and ``fwe``): which words appear most often.

``cwe``: a numbered list of words where 10 common words appear many times (30, or fewer in short
lists) and every other word 3 times; the answer is the 10 common words. ``fwe``: a "coded text" of
made-up words whose frequencies follow Zipf's law (exponent 2); the answer is the 3 most frequent.
One question per document.
"""

from __future__ import annotations

import math
import random
import string

from tools.longctx import Layout, Question, Task
from tools.longctx.haystack import SOURCES, vocabulary

COMMON = 10
COMMON_REPEATS = 30
RARE_REPEATS = 3
ZIPF = 2.0
FREQUENT = 3
FWE_VOCABULARY = 400


def cwe(rng: random.Random, *, source: str, turns: int, sample: int) -> Layout:
    pool = list(dict.fromkeys(word for name in (source, *SOURCES) for word in vocabulary(name)))
    rng.shuffle(pool)
    common, rare = pool[:COMMON], pool[COMMON:]
    order_seed = rng.random()

    def units(count: int) -> list[str]:
        # Short lists repeat the common words less, but always at least twice as often as rare words.
        repeats = max(2 * RARE_REPEATS, min(COMMON_REPEATS, count // (3 * COMMON)))
        rare_slots = max(0, count - COMMON * repeats)
        rare_words = math.ceil(rare_slots / RARE_REPEATS)
        words = [word for word in common for _ in range(repeats)]
        words += [rare[index % len(rare)] for index in range(rare_words) for _ in range(RARE_REPEATS)][
            :rare_slots
        ]
        random.Random(order_seed).shuffle(words)
        return [f"{index + 1}. {word} " for index, word in enumerate(words)]

    return Layout(
        intro="Below is a numbered list of words. Some of them appear far more often than the others.\n\n",
        units=units,
        questions=[
            Question(
                f"What are the {COMMON} most common words in the list above? Answer with the words only.",
                tuple(common),
            )
        ],
        details={"common_repeats": COMMON_REPEATS, "rare_repeats": RARE_REPEATS},
    )


def fwe(rng: random.Random, *, source: str, turns: int, sample: int) -> Layout:
    made_up: list[str] = []
    while len(made_up) < FWE_VOCABULARY:
        word = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(4, 6)))
        if word not in made_up:
            made_up.append(word)
    weights = [1 / (rank + 1) ** ZIPF for rank in range(FWE_VOCABULARY)]
    order_seed = rng.random()

    def units(count: int) -> list[str]:
        total = sum(weights)
        counts = [max(1, math.floor(count * weight / total)) for weight in weights]
        words = [word for word, times in zip(made_up, counts, strict=True) for _ in range(times)][:count]
        random.Random(order_seed).shuffle(words)
        return [f"{word} " for word in words]

    return Layout(
        intro="Below is a coded text: a long run of made-up words, some much more frequent than others.\n\n",
        units=units,
        questions=[
            Question(
                f"What are the {FREQUENT} most frequently appearing words in the coded text above? "
                "Answer with the words only.",
                tuple(made_up[:FREQUENT]),
            )
        ],
        details={"zipf": ZIPF, "vocabulary": FWE_VOCABULARY},
    )


TASKS = (Task("cwe", "cwe", 128, cwe, multi_turn=False), Task("fwe", "fwe", 48, fwe, multi_turn=False))
