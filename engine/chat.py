"""``python -m engine.chat``: chat with a checkpoint, llama.cpp style.

python -m engine.chat                                   # the default model, interactive
python -m engine.chat -p "What is the capital of France?" -n 24 --temp 0
python -m engine.chat -f report.txt --schedule imdc --policy snapkv --memory 512 --chunk 512 --stats
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from engine.attention import PrefillCancelled
from engine.cli import Parser, run_main
from engine.llm import LLM, Completion
from engine.notices import notice
from engine.options import (
    add_model_options,
    add_prefill_options,
    add_sampling_options,
    load_model,
    prefill_config,
    sampling,
)
from engine.prefill import FULL_SCHEDULE, PrefillConfig, PrefillResult
from engine.session import ChatSession

COMMANDS = {
    "/help": "list these commands",
    "/reset": "forget the conversation (a -f document is read again with the next message)",
    "/stats": "the last answer's prefill steps, speeds and memory",
    "/exit": "leave (also /quit, Ctrl-D, or Ctrl-C at the prompt)",
}
HELP = "commands: " + ", ".join(COMMANDS) + "; Ctrl-C stops reading or answering; //text sends /text"


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m engine.chat", description=__doc__.split("\n")[0])
    add_model_options(p)
    p.add_argument("-p", "--prompt", help="answer this one message and exit")
    p.add_argument("-f", "--file", help="a document put in the context before the conversation")
    p.add_argument("-sys", "--system-prompt", help="system message")
    p.add_argument(
        "-n", "--predict", type=int, default=-1, help="tokens to generate per answer (negative: until EOS)"
    )
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens")
    add_sampling_options(p)
    p.add_argument(
        "--query-aware",
        action="store_true",
        help="read -f's document with the first question and compress by that question's attention",
    )
    p.add_argument("--stats", action="store_true", help="print per-step prefill stats after each answer")
    add_prefill_options(p)
    return p


def format_stats(completion: Completion, document: PrefillResult | None = None) -> str:
    """The per-step prefill table (the document's steps first, when it was read for this answer)."""
    steps = [*(document.steps if document else []), *completion.prefill.steps]
    lines = ["step  chunk  memory  seconds  peak MiB"]
    lines += [
        f"{s.index:>4}  {s.chunk:>5}  {s.memory:>6}  {s.seconds:>7.3f}  {s.peak_bytes / 2**20:>8.1f}"
        for s in steps
    ]
    prompt = sum(s.chunk for s in steps)
    seconds = sum(s.seconds for s in steps)
    produced = len(completion.token_ids)
    memory = completion.memory
    lines.append(
        f"prefill {prompt} tokens in {seconds:.2f} s ({prompt / max(seconds, 1e-9):.1f} tok/s); "
        f"decode {produced} tokens in {completion.decode_seconds:.2f} s "
        f"({produced / max(completion.decode_seconds, 1e-9):.1f} tok/s); memory {memory.kept()} "
        f"tokens{'' if memory.uniform else ' per head on average'} + {min(memory.sinks, memory.seen)} "
        f"sinks ({memory.nbytes / 2**20:.1f} MiB)"
    )
    if completion.reform is not None:
        r, layers = completion.reform, len(memory.layers)
        read = (
            f"read {r.document_tokens} tokens in {r.read_seconds:.2f} s" if r.read_seconds else "read before"
        )
        lines.append(
            f"REFORM phase 1: {read} with {r.read_layers} of {layers} layers (memory "
            f"{r.read_memory_bytes / 2**20:.1f} MiB, embeddings {r.embedding_bytes / 2**20:.1f} MiB)"
        )
        lines.append(
            f"REFORM phase 2: gathered {r.gathered} of {r.document_tokens} tokens for a "
            f"{r.question_tokens}-token question in {r.gather_seconds:.2f} s, recomputed them and the "
            f"conversation in {r.recompute_seconds:.2f} s"
        )
    return "\n".join(lines)


class Interrupts:
    """While a message is read or answered, Ctrl-C stops it; a second Ctrl-C before it stops exits."""

    def __init__(self) -> None:
        self.cancel = threading.Event()

    def __enter__(self) -> threading.Event:
        self.cancel.clear()
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self.cancel

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum: int, frame: object) -> None:
        if self.cancel.is_set():
            raise KeyboardInterrupt
        self.cancel.set()


def warn_if_beyond_window(llm: LLM, session: ChatSession, config: PrefillConfig) -> None:
    if session.document is None or config.schedule != FULL_SCHEDULE:
        return
    tokens = session.document_tokens()
    window = llm.config.max_position_embeddings
    if tokens > window:
        notice(
            f"the document has {tokens} tokens, more than the model's {window}-token window; "
            "try --schedule imdc --policy snapkv --memory 1024 --chunk 1024"
        )


def run(args: argparse.Namespace) -> int:
    config = prefill_config(args)
    options = sampling(args)
    document = Path(args.file).read_text(encoding="utf-8") if args.file else None
    print(f"loading {args.model or 'the default model'} ...", file=sys.stderr)
    llm = load_model(args)
    session = ChatSession(
        llm,
        prefill=config,
        sampling=options,
        system_prompt=args.system_prompt,
        document=document,
        query_aware=args.query_aware,
    )
    warn_if_beyond_window(llm, session, config)
    interrupts = Interrupts()

    def answer(text: str) -> bool:
        """Answer ``text``; False when Ctrl-C stopped the reading (the conversation is unchanged)."""
        with interrupts as cancel:
            try:
                completion = session.ask(
                    text,
                    max_tokens=args.predict,
                    on_text=lambda piece: print(piece, end="", flush=True),
                    cancel=cancel,
                    ignore_eos=args.ignore_eos,
                )
            except PrefillCancelled:
                print("[stopped reading; the conversation is as it was before this message]", file=sys.stderr)
                return False
        print(" [stopped]" if completion.finish_reason == "cancelled" else "", flush=True)
        if args.stats:
            # In -p mode the document is read inside the first answer: show its steps there.
            document = session.document_prefill if args.prompt is not None else None
            print(format_stats(completion, document), file=sys.stderr)
        return True

    if args.prompt is not None:
        return 0 if answer(args.prompt) else 130
    if document is not None and not args.query_aware:
        with interrupts as cancel:
            try:
                session.read_document(cancel=cancel)
                print(f"read {session.document_tokens()} tokens of {args.file}", file=sys.stderr)
            except PrefillCancelled:
                print(
                    f"stopped reading {args.file}; it will be read with your first message", file=sys.stderr
                )
    print(HELP, file=sys.stderr)
    while True:
        try:
            text = input("\n> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        command = text.strip()
        if command.startswith("//"):
            answer(command[1:])
        elif command in ("/exit", "/quit"):
            return 0
        elif command == "/help":
            print("\n".join(f"{name:<7} {meaning}" for name, meaning in COMMANDS.items()), file=sys.stderr)
        elif command == "/reset":
            session.reset()
            print("conversation reset", file=sys.stderr)
        elif command == "/stats":
            print(format_stats(session.turns[-1]) if session.turns else "no answer yet", file=sys.stderr)
        elif command.startswith("/"):
            print(f"unknown command {command.split()[0]}, see /help", file=sys.stderr)
        elif command:
            answer(text)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run_main(lambda: run(args), debug=args.debug)


if __name__ == "__main__":
    status = main()
    # Leaving: a further Ctrl-C while the interpreter shuts down must not kill it by the signal.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(status)
