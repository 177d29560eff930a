"""The classic pass-key test: a 5-digit key in a haystack of five sentences repeated over and over.

"The pass key is KEY. Remember it. KEY is the pass key." sits at depth 0.1, 0.5 or 0.9 (sample 0, 1,
2, then again), so 3k samples cover each depth with k keys. The haystack is always the repeated
filler, whatever the prose source: the test is whether a fact survives among text it resembles
nothing of. One question per document.
"""

from __future__ import annotations

import random

from tools.longctx import Layout, Question, Task

INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n\n"
)
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "There is a pass key hidden in the text above. What is the pass key?"
REPEAT_SENTENCES = (
    "The grass is green. ",
    "The sky is blue. ",
    "The sun is yellow. ",
    "Here we go. ",
    "There and back again. ",
)
DEPTHS = (0.1, 0.5, 0.9)
KEY_DIGITS = 5


def layout(rng: random.Random, *, source: str, turns: int, sample: int) -> Layout:
    key = str(rng.randrange(10 ** (KEY_DIGITS - 1), 10**KEY_DIGITS))
    depth = DEPTHS[sample % len(DEPTHS)]
    needle = NEEDLE.format(key=key)
    return Layout(
        INTRO,
        lambda count: [REPEAT_SENTENCES[index % len(REPEAT_SENTENCES)] for index in range(count)],
        [Question(QUESTION, (key,), (depth,), (needle,))],
        [(depth, needle)],
    )


TASKS = (Task("passkey", "passkey", 16, layout, multi_turn=False),)
