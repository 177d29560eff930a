"""Variable tracking (RULER's ``vt``): follow chains of assignments scattered through prose.

A chain starts ``VAR QXBTF = 48213.`` and continues ``VAR MLPEA = VAR QXBTF.`` for 1 to 4 hops; 1 to
3 chains (each with its own value) are drawn per case, and the question asks for every variable
bound to one value. With several turns each question asks about a chain of its own.
"""

from __future__ import annotations

import itertools
import random
import string

from tools.longctx import Layout, Question, Task, depths_of, placed
from tools.longctx.haystack import passage

HOPS = (1, 4)
CHAINS = (1, 3)
NAME_LETTERS = 5

INTRO = (
    "The text below contains variable assignments of the form VAR NAME = VALUE, hidden among other "
    "sentences. Track them: you will be asked which variables end up with a given value.\n\n"
)


def ask(value: str) -> str:
    return (
        f"Which variables are assigned the value {value} in the text above, directly or through other "
        "variables? List all of their names."
    )


def layout(rng: random.Random, *, source: str, turns: int, sample: int) -> Layout:
    hops = rng.randint(*HOPS)
    chains = max(turns, rng.randint(*CHAINS))
    names: set[str] = set()
    values: set[str] = set()

    def fresh(pool: set[str], draw) -> str:
        while (item := draw()) in pool:
            pass
        pool.add(item)
        return item

    chain_list = []
    for _ in range(chains):
        value = fresh(values, lambda: str(rng.randrange(10**4, 10**5)))
        members = [fresh(names, lambda: "".join(rng.choices(string.ascii_uppercase, k=NAME_LETTERS)))]
        members += [
            fresh(names, lambda: "".join(rng.choices(string.ascii_uppercase, k=NAME_LETTERS)))
            for _ in range(hops)
        ]
        statements = [f"VAR {members[0]} = {value}. "]
        statements += [f"VAR {name} = VAR {previous}. " for previous, name in itertools.pairwise(members)]
        chain_list.append((value, members, statements))
    # Chains interleave, each in its own order: statement i of a chain comes after statement i - 1.
    queues = [list(statements) for _, _, statements in chain_list]
    ordered = []
    while any(queues):
        queue = rng.choice([q for q in queues if q])
        ordered.append(queue.pop(0))
    insertions = placed(rng, ordered)
    questions = [
        Question(ask(value), tuple(members), depths_of(insertions, statements), tuple(statements))
        for value, members, statements in chain_list[:turns]
    ]
    return Layout(
        INTRO, passage(source, rng), questions, insertions, details={"hops": hops, "chains": chains}
    )


TASKS = (Task("vt", "vt", 64, layout),)
