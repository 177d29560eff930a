"""BABILong-style question answering: a bAbI-like story scattered through prose, asked about at the end.

A small world is simulated (people move between places, pick up and drop objects) and told in
sentences such as "Mary moved to the bathroom." and "John picked up the football.", placed in order
at random depths of the haystack. ``qa1``: where is a person (one supporting fact); ``qa2``: where is
an object (two: who took it, where they went); ``qa3``: where was an object before its current place
(three). The answer is a location. With several turns each question asks about another person or
object of the same story.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from tools.longctx import Layout, Question, Task, depths_of, placed
from tools.longctx.haystack import passage

PEOPLE = ("Mary", "John", "Daniel", "Sandra", "Fred", "Julie")
PLACES = ("bathroom", "hallway", "garden", "office", "bedroom", "kitchen")
THINGS = ("football", "apple", "milk", "book", "umbrella", "key")
MOVES = ("moved to", "went to", "journeyed to", "travelled to", "went back to")
TAKES = ("picked up", "got", "grabbed", "took")
DROPS = ("dropped", "discarded", "put down", "left")
EVENTS = (6, 24)  # story sentences, fewest and most
INTRO = (
    "The text below hides a story: people move between places and pick up or put down objects. "
    "Follow it: you will be asked where people and objects are.\n\n"
)


@dataclass
class World:
    """The state of a story as it is told; every sentence told is kept, in order."""

    rng: random.Random
    story: list[str] = field(default_factory=list)
    person_at: dict[str, tuple[str, str]] = field(default_factory=dict)  # person -> (place, sentence)
    holder: dict[str, str] = field(default_factory=dict)  # thing -> person holding it
    # thing -> [(place, sentences that put it there)], a new entry each time its place changes
    history: dict[str, list[tuple[str, list[str]]]] = field(default_factory=dict)

    def step(self) -> None:
        kind = self.rng.choices(("move", "take", "drop"), weights=(5, 3, 2))[0]
        if kind == "take":
            self._take()
        elif kind == "drop":
            self._drop()
        else:
            self._move()

    def _say(self, text: str) -> str:
        self.story.append(text)
        return text

    def _move(self) -> None:
        person = self.rng.choice(PEOPLE)
        old = self.person_at.get(person, (None, ""))[0]
        place = self.rng.choice([p for p in PLACES if p != old])
        sentence = self._say(f"{person} {self.rng.choice(MOVES)} the {place}. ")
        self.person_at[person] = (place, sentence)
        for thing, who in self.holder.items():
            if who == person:
                took = self.history[thing][-1][1][0]
                self.history[thing].append((place, [took, sentence]))

    def _take(self) -> None:
        placed_people = [p for p in PEOPLE if p in self.person_at]
        if not placed_people:
            return self._move()
        person = self.rng.choice(placed_people)
        place = self.person_at[person][0]
        free = [t for t in THINGS if t not in self.holder and self.history.get(t, [(place,)])[-1][0] == place]
        if not free:
            return self._move()
        thing = self.rng.choice(free)
        sentence = self._say(f"{person} {self.rng.choice(TAKES)} the {thing}. ")
        self.holder[thing] = person
        trail = self.history.setdefault(thing, [])
        if not trail:
            trail.append((place, [sentence, self.person_at[person][1]]))
        else:  # picked up where it was left: its place does not change, the reason does
            trail[-1] = (place, [sentence])
        return None

    def _drop(self) -> None:
        held = list(self.holder)
        if not held:
            return self._move()
        thing = self.rng.choice(held)
        person = self.holder.pop(thing)
        sentence = self._say(f"{person} {self.rng.choice(DROPS)} the {thing}. ")
        place, reasons = self.history[thing][-1]
        self.history[thing][-1] = (place, [*reasons, sentence])
        return None


def ask_person(world: World) -> list[tuple[str, str, list[str]]]:
    return [
        (f"Where is {person}?", place, [sentence]) for person, (place, sentence) in world.person_at.items()
    ]


def ask_thing(world: World) -> list[tuple[str, str, list[str]]]:
    return [(f"Where is the {thing}?", trail[-1][0], trail[-1][1]) for thing, trail in world.history.items()]


def ask_before(world: World) -> list[tuple[str, str, list[str]]]:
    return [
        (f"Where was the {thing} before the {trail[-1][0]}?", trail[-2][0], trail[-2][1] + trail[-1][1])
        for thing, trail in world.history.items()
        # "before the kitchen" is ambiguous when the object was in the kitchen earlier too
        if len(trail) >= 2 and [place for place, _ in trail].count(trail[-1][0]) == 1
    ]


def story_task(questions: Callable[[World], list[tuple[str, str, list[str]]]]) -> Callable[..., Layout]:
    def layout(rng: random.Random, *, source: str, turns: int, sample: int) -> Layout:
        # Tell stories until one has a question for every turn (a few tries at most).
        while True:
            world = World(rng)
            for _ in range(rng.randint(*EVENTS)):
                world.step()
            asked = questions(world)
            if len(asked) >= turns:
                break
        rng.shuffle(asked)
        insertions = placed(rng, world.story)
        return Layout(
            INTRO,
            passage(source, rng),
            [
                Question(
                    f"{text} Answer with the location only.",
                    (answer,),
                    depths_of(insertions, reasons),
                    tuple(dict.fromkeys(reasons)),
                )
                for text, answer, reasons in asked[:turns]
            ],
            insertions,
            details={"story_sentences": len(world.story)},
        )

    return layout


TASKS = (
    Task("qa1", "qa", 32, story_task(ask_person)),
    Task("qa2", "qa", 32, story_task(ask_thing)),
    Task("qa3", "qa", 32, story_task(ask_before)),
)
