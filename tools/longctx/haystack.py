"""Natural English prose from the Python standard library, every machine's own long text.

Two sources, so that a task can be checked on different text: ``pydoc`` (the language reference
topics that ``pydoc_data`` ships) and ``docstrings`` (the documentation strings of a fixed list of
pure-Python standard modules). Both are cut into sentences, keeping only paragraphs that read as
prose (no code, headings or signatures). The text is the same on every machine with the same Python
version; reports record that version.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import random
import re
import warnings
from collections.abc import Callable

SOURCES = ("pydoc", "docstrings")

# Pure-Python modules present in every CPython 3.10-3.13 build, whose docstrings are mostly prose.
DOCSTRING_MODULES = (
    "argparse", "asyncio", "calendar", "collections", "concurrent.futures", "configparser", "contextlib",
    "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "doctest", "email.message", "enum",
    "fractions", "ftplib", "functools", "gettext", "glob", "gzip", "heapq", "html.parser", "http.client",
    "imaplib", "inspect", "ipaddress", "json", "logging", "mailbox", "mimetypes", "multiprocessing",
    "optparse", "pathlib", "pdb", "pickle", "pkgutil", "platform", "poplib", "pprint", "queue", "random",
    "sched", "secrets", "shlex", "shutil", "smtplib", "socket", "statistics", "string", "subprocess",
    "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize", "traceback", "typing",
    "unittest", "unittest.mock", "urllib.parse", "urllib.request", "uuid", "warnings", "weakref",
    "xml.etree.ElementTree", "zipfile",
)  # fmt: skip


def sentences(source: str) -> tuple[str, ...]:
    """The source's sentences in order, each ending with its separator (a space, or a paragraph break)."""
    if source not in SOURCES:
        raise ValueError(f"unknown haystack source {source!r}; use one of {', '.join(SOURCES)}")
    return _pydoc_sentences() if source == "pydoc" else _docstring_sentences()


def passage(source: str, rng: random.Random) -> Callable[[int], list[str]]:
    """A random place in ``source``: a function giving its first ``count`` sentences from there
    (wrapping around at the source's end)."""
    text = sentences(source)
    start = rng.randrange(len(text))
    return lambda count: [text[(start + index) % len(text)] for index in range(count)]


@functools.cache
def _pydoc_sentences() -> tuple[str, ...]:
    from pydoc_data.topics import topics

    return _split([topics[name] for name in sorted(topics)])


@functools.cache
def _docstring_sentences() -> tuple[str, ...]:
    documents, seen = [], set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # some modules warn about deprecations on import
        for name in DOCSTRING_MODULES:
            module = importlib.import_module(name)
            for item in _documented(module):
                doc = inspect.getdoc(item)
                if doc and doc not in seen:
                    seen.add(doc)
                    documents.append(doc)
    return _split(documents)


def _documented(module: object) -> list[object]:
    """The module, its public members, and their public members, in name order."""
    items = [module]
    for name in sorted(vars(module)):
        member = getattr(module, name)
        if name.startswith("_") or getattr(member, "__module__", None) != module.__name__:
            continue
        items.append(member)
        if inspect.isclass(member):
            attributes = vars(member)
            items += [attributes[name] for name in sorted(attributes) if not name.startswith("_")]
    return items


def _split(documents: list[str]) -> tuple[str, ...]:
    """The prose sentences of ``documents``, each once: documentation repeats stock phrases."""
    result: list[str] = []
    seen: set[str] = set()
    for document in documents:
        for paragraph in document.split("\n\n"):
            text = " ".join(line.strip() for line in paragraph.splitlines()).strip()
            if not _is_prose(text):
                continue
            parts = re.split(r"(?<=[.!?])\s+(?=[A-Z])", text)
            for index, part in enumerate(parts):
                if part not in seen:
                    seen.add(part)
                    result.append(part + (" " if index < len(parts) - 1 else "\n\n"))
    return tuple(result)


def _is_prose(text: str) -> bool:
    if len(text) < 100 or not text.endswith(".") or ">>>" in text:
        return False
    plain = sum(c.isalpha() or c in " ,.;'-" for c in text)
    return plain >= 0.9 * len(text)


@functools.cache
def vocabulary(source: str) -> tuple[str, ...]:
    """Distinct lowercase words of 4 to 10 letters in ``source``, in order of first appearance."""
    words = dict.fromkeys(
        word for sentence in sentences(source) for word in re.findall(r"\b[a-z]{4,10}\b", sentence)
    )
    return tuple(words)
