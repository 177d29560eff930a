"""What every command line of the project shares: one-line errors, ``--debug``, and KEY=VALUE options.

A failure the user can fix is printed as one line (what was wrong and what to do) with exit status 2;
Ctrl-C exits with 130 and a word; anything else is a bug, still reported in one line, with the way to
see its traceback: ``--debug`` or ``IMDC_DEBUG=1``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

DEBUG_VARIABLE = "IMDC_DEBUG"


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line that points at ``--help``, and which takes
    ``--debug`` (show tracebacks)."""

    def __init__(self, *args, debug_option: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if debug_option:
            self.add_argument(
                "--debug", action="store_true", help=f"show tracebacks (or set {DEBUG_VARIABLE}=1)"
            )

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def debugging(argv_debug: bool = False) -> bool:
    return argv_debug or os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")


def run_main(
    body: Callable[[], int], *, debug: bool = False, expected: tuple[type[BaseException], ...] = ()
) -> int:
    """Run a command's body: its exit status, or one line on stderr for any failure.

    ``ValueError`` and ``OSError`` (and ``expected``) are the user's to fix and are printed as they
    are; any other exception is printed with its type and how to see the traceback.
    """
    debug = debugging(debug)
    try:
        return body()
    except KeyboardInterrupt:
        if debug:
            raise
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, *expected) as error:
        if debug:
            raise
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return 2
    except Exception as error:
        if debug:
            raise
        print(
            f"error: {type(error).__name__}: {_one_line(error)} (unexpected; run with --debug or "
            f"{DEBUG_VARIABLE}=1 for the traceback and report it)",
            file=sys.stderr,
        )
        return 1


SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """Bytes from ``"64MiB"``, ``"1.5GB"`` or ``"1000000"`` (argparse type: errors name the form)."""
    cleaned = text.strip().upper()
    number = cleaned.rstrip("KMGIB")
    unit = cleaned[len(number) :]
    try:
        value = float(number) * SIZE_UNITS[unit]
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 64MiB, 1.5GB or 1000000") from None
    if not value >= 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a size must be at least one byte")
    return int(value)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) if str(error) else type(error).__name__
    if isinstance(error, OSError) and error.filename is not None and str(error.filename) not in text:
        text = f"{text}: {error.filename}"
    return text


def parse_options(pairs: Sequence[str], flag: str) -> dict[str, object]:
    """``["k=v", ...]`` as a dict whose values are bools, None, ints, floats or strings."""
    options: dict[str, object] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{flag} takes KEY=VALUE, got {pair!r}")
        options[key.strip()] = _value(text.strip())
    return options


def _value(text: str) -> object:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text
