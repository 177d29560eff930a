"""Long-context tasks generated locally, seeded, at a requested length: RULER- and BABILong-style.

Every task lays out a document (an instruction, then a haystack of natural prose or of list entries,
with the facts to find placed at chosen depths) and one or more questions with their expected
answers. ``make_case`` sizes the haystack so that the chat prompt of the document and the first
question has the requested number of tokens (within 2%), the same for the same seed on every machine
(with the same Python version, whose standard library supplies the prose). Several questions about
one document (``turns``) are asked one after another over the same memory.

    case = make_case("niah_single", tokenizer, length=4096, seed=0)
    case.document, case.questions[0].text, case.questions[0].expected
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from tools.longctx.haystack import SOURCES

LENGTH_TOLERANCE = 0.02


class ChatTokenizer(Protocol):
    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]: ...


@dataclass(frozen=True)
class Question:
    text: str
    expected: tuple[str, ...]  # every string a full-score answer contains
    depths: tuple[float, ...] = ()  # where the facts it needs sit, 0 (start) to 1 (end)
    facts: tuple[str, ...] = ()  # the sentences of the document it needs


@dataclass(frozen=True)
class Layout:
    """A task's document before sizing: ``units(n)`` is a haystack of ``n`` units (sentences or list
    entries), ``insertions`` are (depth, text) facts placed between units (0: before the first, 1:
    after the last, in the given order at equal depths)."""

    intro: str
    units: Callable[[int], list[str]]
    questions: list[Question]
    insertions: list[tuple[float, str]] = field(default_factory=list)
    outro: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def document(self, count: int, words: int = 0) -> str:
        """The document with ``count`` units, and the first ``words`` words of one more at its end
        (to size it finer than a unit)."""
        units = self.units(count + (words > 0))
        if words:
            units[-1] = "".join(re.findall(r"\S+\s*", units[-1])[:words]).rstrip() + " "
        slots: dict[int, list[str]] = {}
        for depth, text in self.insertions:
            slots.setdefault(round(depth * count), []).append(text)
        parts = [self.intro]
        for index in range(len(units) + 1):
            parts += slots.get(index, [])
            if index < len(units):
                parts.append(units[index])
        return ("".join(parts).rstrip() + self.outro).rstrip()


@dataclass(frozen=True)
class Task:
    name: str
    family: str  # "niah", "vt", "cwe", "fwe", "qa"
    answer_tokens: int  # greedy tokens generated per question
    layout: Callable[..., Layout]  # (rng, *, source, turns, sample) -> Layout
    multi_turn: bool = True  # can carry several independent questions about one document


@dataclass(frozen=True)
class Case:
    task: str
    length: int  # tokens requested
    tokens: int  # tokens of the chat prompt of the document and the first question
    seed: int
    sample: int
    source: str
    document: str
    questions: tuple[Question, ...]
    answer_tokens: int
    details: dict[str, Any]  # task-specific settings drawn for this case (hops, chains, frequencies)


def prompt_messages(document: str, question: str) -> list[dict[str, str]]:
    """The first user message as ``engine.ChatSession`` builds it: the document, then the question."""
    return [{"role": "user", "content": f"{document}\n\n{question}"}]


def make_case(
    task: str,
    tokenizer: ChatTokenizer,
    length: int,
    *,
    seed: int = 0,
    sample: int = 0,
    source: str = "pydoc",
    turns: int = 1,
) -> Case:
    """Sample ``sample`` of ``task`` at ``length`` tokens; the same arguments give the same case."""
    spec = TASKS.get(task)
    if spec is None:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    if source not in SOURCES:
        raise ValueError(f"unknown haystack source {source!r}; use one of {', '.join(SOURCES)}")
    if turns < 1 or (turns > 1 and not spec.multi_turn):
        raise ValueError(f"task {task} takes {'one question' if not spec.multi_turn else 'turns >= 1'}")
    rng = random.Random(f"{task}/{length}/{seed}/{sample}/{source}/{turns}")
    layout = spec.layout(rng, source=source, turns=turns, sample=sample)
    first = layout.questions[0].text

    def tokens(count: int, words: int = 0) -> int:
        return len(tokenizer.encode_chat(prompt_messages(layout.document(count, words), first)))

    count, words = fit(tokens, length, what=f"a {task} prompt")
    return Case(
        task=task,
        length=length,
        tokens=tokens(count, words),
        seed=seed,
        sample=sample,
        source=source,
        document=layout.document(count, words),
        questions=tuple(layout.questions),
        answer_tokens=spec.answer_tokens,
        details=dict(layout.details),
    )


def placed(rng: random.Random, facts: Sequence[str], levels: int = 40) -> list[tuple[float, str]]:
    """``facts`` in their order at random depths, each one of ``levels + 1`` evenly spaced levels
    (as RULER places needles)."""
    depths = sorted(rng.randrange(levels + 1) / levels for _ in facts)
    return list(zip(depths, facts, strict=True))


def depths_of(insertions: Sequence[tuple[float, str]], facts: Sequence[str]) -> tuple[float, ...]:
    where = {text: depth for depth, text in insertions}
    return tuple(where[fact] for fact in facts)


def fit(tokens: Callable[..., int], target: int, *, what: str) -> tuple[int, int]:
    """(units, words of one more unit) whose prompt has ``target`` tokens within ``LENGTH_TOLERANCE``.

    Token counts grow almost linearly with the units, so a few secant steps find the most units that
    stay within the target; words of the next unit then close the gap a long sentence would leave.
    """
    bare = tokens(0)
    if bare > target * (1 + LENGTH_TOLERANCE):
        raise ValueError(f"{what} needs at least {bare} tokens with this tokenizer; asked for {target}")
    probe = 128  # two probes past 0: some haystacks have a floor of units (cwe's common words)
    low = tokens(probe)
    per_unit = max(0.25, (tokens(2 * probe) - low) / probe)
    count = max(0, probe + round((target - low) / per_unit))
    for _ in range(12):
        step = round((target - tokens(count)) / per_unit)
        if step == 0:
            break
        count = max(0, count + step)
    while count > 0 and tokens(count) > target:
        count -= 1
    while tokens(count + 1) <= target:
        count += 1
    words, best = 0, tokens(count)
    if target - best > LENGTH_TOLERANCE * target / 4:
        low_words, high_words = 0, 4096  # bisect the words of the next unit (it has fewer, then stops)
        while low_words < high_words:
            middle = (low_words + high_words + 1) // 2
            if tokens(count, middle) <= target:
                low_words = middle
            else:
                high_words = middle - 1
        words, best = low_words, tokens(count, low_words)
    if abs(best - target) > LENGTH_TOLERANCE * target:
        raise ValueError(f"could not build {what} of {target} tokens (got {best})")
    return count, words


def score(answer: str, expected: Sequence[str]) -> float:
    """RULER's measure: the fraction of the expected strings found in the answer, ignoring case."""
    if not expected:
        raise ValueError("a question needs at least one expected answer")
    found = sum(item.lower() in answer.lower() for item in expected)
    return found / len(expected)


from tools.longctx import babi, niah, passkey, variables, words  # noqa: E402  (the tasks register below)

TASKS: dict[str, Task] = {
    task.name: task for module in (niah, variables, words, babi, passkey) for task in module.TASKS
}
PRESETS = {
    "ruler": (
        "niah_single", "niah_single_word", "niah_single_uuid", "niah_multikey", "niah_multikey_many",
        "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe",
    ),
    "babilong": ("qa1", "qa2", "qa3"),
    "core": ("niah_single", "niah_multikey", "niah_multivalue", "vt", "cwe", "qa1", "qa2"),
}  # fmt: skip


def expand_tasks(text: str) -> list[str]:
    """A comma list of task and preset names as task names, each once, in the order given."""
    names: list[str] = []
    for part in (piece.strip() for piece in text.split(",")):
        if not part:
            continue
        members = PRESETS.get(part, (part,))
        for name in members:
            if name not in TASKS:
                known = ", ".join([*TASKS, *PRESETS])
                raise ValueError(f"unknown task {name!r}; known tasks and presets: {known}")
            if name not in names:
                names.append(name)
    if not names:
        raise ValueError("--tasks needs at least one task or preset, e.g. core")
    return names
