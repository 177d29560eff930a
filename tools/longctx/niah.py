"""Needle in a haystack, RULER style: "One of the special magic numbers for KEY is: VALUE." in prose.

``niah_single`` (a 7-digit number; ``_word`` and ``_uuid`` variants), ``niah_multikey`` (among 3
distractor needles with other keys), ``niah_multikey_many`` (a haystack made only of needles),
``niah_multivalue`` (four values for one key, all asked for) and ``niah_multiquery`` (four keys asked
at once). With several turns, each question asks about needles of its own.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable

from tools.longctx import Layout, Question, Task, depths_of, placed
from tools.longctx.haystack import passage, vocabulary

DISTRACTORS = 3
GROUP = 4  # values per key (multivalue), keys per question (multiquery)
PLURAL = {"number": "numbers", "word": "words", "uuid": "uuids"}


class Needles:
    """Distinct keys and values for one case, drawn from the case's random stream."""

    def __init__(self, rng: random.Random, source: str, kind: str) -> None:
        self.rng, self.kind = rng, kind
        self.words = vocabulary(source)
        self.used: set[str] = set()

    def key(self) -> str:
        return self._fresh(lambda: f"{self.rng.choice(self.words)}-{self.rng.choice(self.words)}")

    def value(self) -> str:
        if self.kind == "number":
            return self._fresh(lambda: str(self.rng.randrange(10**6, 10**7)))
        if self.kind == "word":
            return self._fresh(lambda: self.rng.choice(self.words))
        return self._fresh(lambda: str(uuid.UUID(int=self.rng.getrandbits(128), version=4)))

    def sentence(self, key: str, value: str) -> str:
        return f"One of the special magic {PLURAL[self.kind]} for {key} is: {value}. "

    def _fresh(self, draw: Callable[[], str]) -> str:
        while True:
            item = draw()
            if item not in self.used:
                self.used.add(item)
                return item


def intro(kind: str) -> str:
    return (
        f"Some special magic {PLURAL[kind]} are hidden in the text below. Memorize them: you will be "
        "asked about them afterwards.\n\n"
    )


def ask_one(kind: str, key: str) -> str:
    question = f"What is the special magic {kind} for {key} mentioned in the text above?"
    return f"{question} Answer with the {kind} only."


def ask_all(kind: str, key: str) -> str:
    return (
        f"What are all the special magic {PLURAL[kind]} for {key} mentioned in the text above? "
        "List every one of them."
    )


def ask_many(kind: str, keys: list[str]) -> str:
    listed = ", ".join(keys[:-1]) + f" and {keys[-1]}"
    return (
        f"What are the special magic {PLURAL[kind]} for {listed} mentioned in the text above? "
        f"Give the {kind} for each of them."
    )


def needle_layout(
    rng: random.Random,
    needles: Needles,
    groups: list[list[tuple[str, str]]],
    ask: Callable[[list[tuple[str, str]]], str],
    units: Callable[[int], list[str]],
    distractors: int = 0,
) -> Layout:
    """Each group of (key, value) needles is one question; ``distractors`` more needles with other
    keys; all shuffled and placed at random depths in ``units``."""
    others = [(needles.key(), needles.value()) for _ in range(distractors)]
    facts = [fact for group in groups for fact in group] + others
    rng.shuffle(facts)
    insertions = placed(rng, [needles.sentence(key, value) for key, value in facts])
    questions = []
    for group in groups:
        facts = [needles.sentence(key, value) for key, value in group]
        questions.append(
            Question(
                ask(group), tuple(value for _, value in group), depths_of(insertions, facts), tuple(facts)
            )
        )
    return Layout(intro(needles.kind), units, questions, insertions)


def single(kind: str, distractors: int = 0) -> Callable[..., Layout]:
    def layout(rng: random.Random, *, source: str, turns: int, sample: int) -> Layout:
        needles = Needles(rng, source, kind)
        groups = [[(needles.key(), needles.value())] for _ in range(turns)]
        ask = lambda group: ask_one(kind, group[0][0])  # noqa: E731
        return needle_layout(rng, needles, groups, ask, passage(source, rng), distractors)

    return layout


def multikey_many(rng: random.Random, *, source: str, turns: int, sample: int) -> Layout:
    """The haystack itself is needles with other keys: every sentence is a distractor."""
    needles = Needles(rng, source, "number")
    groups = [[(needles.key(), needles.value())] for _ in range(turns)]
    filler_seed = rng.random()

    def units(count: int) -> list[str]:
        filler = Needles(random.Random(filler_seed), source, "number")
        filler.used = set(needles.used)  # never repeat an asked-for key or value
        return [filler.sentence(filler.key(), filler.value()) for _ in range(count)]

    return needle_layout(rng, needles, groups, lambda group: ask_one("number", group[0][0]), units)


def multivalue(rng: random.Random, *, source: str, turns: int, sample: int) -> Layout:
    needles = Needles(rng, source, "number")
    groups = []
    for _ in range(turns):
        key = needles.key()
        groups.append([(key, needles.value()) for _ in range(GROUP)])
    ask = lambda group: ask_all("number", group[0][0])  # noqa: E731
    return needle_layout(rng, needles, groups, ask, passage(source, rng))


def multiquery(rng: random.Random, *, source: str, turns: int, sample: int) -> Layout:
    needles = Needles(rng, source, "number")
    groups = [[(needles.key(), needles.value()) for _ in range(GROUP)] for _ in range(turns)]
    ask = lambda group: ask_many("number", [key for key, _ in group])  # noqa: E731
    return needle_layout(rng, needles, groups, ask, passage(source, rng))


# Answer budgets leave room for the restated question small models begin with (digits are one token each).
TASKS = (
    Task("niah_single", "niah", 48, single("number")),
    Task("niah_single_word", "niah", 48, single("word")),
    Task("niah_single_uuid", "niah", 80, single("uuid")),
    Task("niah_multikey", "niah", 48, single("number", DISTRACTORS)),
    Task("niah_multikey_many", "niah", 48, multikey_many),
    Task("niah_multivalue", "niah", 96, multivalue),
    Task("niah_multiquery", "niah", 128, multiquery),
)
