"""A modular long-context inference engine: chunked prefill into a compressed KV memory.

    import engine
    llm = engine.load()                                   # the default model, SmolLM2-135M-Instruct
    answer = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                      sampling=engine.GREEDY, max_tokens=24)
    long = llm.generate(document, prefill=engine.PrefillConfig(schedule="imdc", policy="snapkv",
                                                               memory=256, chunk=256))

The names below are imported on first use, so that ``backends``, ``models``, ``schedules`` and
``policies`` can import ``engine.registry`` without pulling in the whole engine.
"""

from importlib import import_module
from typing import Any

_PUBLIC = {
    "GREEDY": "engine.generate",
    "Sampling": "engine.generate",
    "LLM": "engine.llm",
    "Completion": "engine.llm",
    "load": "engine.llm",
    "KVMemory": "engine.cache",
    "PrefillCancelled": "engine.attention",
    "PrefillConfig": "engine.prefill",
    "PrefillResult": "engine.prefill",
    "StepStats": "engine.prefill",
    "ChatSession": "engine.session",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    return getattr(import_module(_PUBLIC[name]), name)
