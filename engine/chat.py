"""``python -m engine.chat``: chat with a checkpoint, llama.cpp style.

python -m engine.chat                                   # the default model, interactive
python -m engine.chat -p "What is the capital of France?" -n 24 --temp 0
python -m engine.chat -f report.txt --schedule imdc --policy snapkv --memory 512 --chunk 512 --stats
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

import backends
from engine.attention import PrefillCancelled
from engine.cli import Parser, parse_options, run_main
from engine.generate import Sampling
from engine.llm import LLM, Completion, load
from engine.notices import notice
from engine.prefill import FULL_SCHEDULE, NO_POLICY, PrefillConfig, PrefillResult
from engine.reform import Reform
from engine.registry import load_plugin
from engine.session import ChatSession

COMMANDS = {
    "/help": "list these commands",
    "/reset": "forget the conversation (a -f document is read again with the next message)",
    "/stats": "the last answer's prefill steps, speeds and memory",
    "/exit": "leave (also /quit, Ctrl-D, or Ctrl-C at the prompt)",
}
HELP = "commands: " + ", ".join(COMMANDS) + "; Ctrl-C stops reading or answering; //text sends /text"
REFORM_OPTIONS = [field.name for field in dataclasses.fields(Reform)]
DEFAULT_BUDGET = 1024  # tokens of --memory and --chunk when a policy is named without them
FLOAT16_SPEEDUP = "1.5-2.7x faster CPU decode, logits within ~0.04 (docs/RESULTS.md)"
PLUGIN_HELP = "import a module (dotted name, or a .py file) that registers policies, schedules or backends"


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m engine.chat", description=__doc__.split("\n")[0])
    p.add_argument("-m", "--model", help="checkpoint directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("-p", "--prompt", help="answer this one message and exit")
    p.add_argument("-f", "--file", help="a document put in the context before the conversation")
    p.add_argument("-sys", "--system-prompt", help="system message")
    p.add_argument(
        "-n", "--predict", type=int, default=-1, help="tokens to generate per answer (negative: until EOS)"
    )
    p.add_argument("--temp", type=float, default=0.8, help="temperature (0: greedy)")
    p.add_argument("--top-k", type=int, default=40, help="top-k sampling (0: off)")
    p.add_argument("--top-p", type=float, default=0.95, help="top-p sampling (1: off)")
    p.add_argument("--min-p", type=float, default=0.05, help="min-p sampling (0: off)")
    p.add_argument("--repeat-penalty", type=float, default=1.0, help="repetition penalty (1: off)")
    p.add_argument("--repeat-last-n", type=int, default=64, help="tokens the repetition penalty looks back")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens")
    p.add_argument("-s", "--seed", type=int, default=-1, help="sampling seed (-1: random)")
    p.add_argument("--backend", default="auto", help=f"attention backend: {', '.join(backends.available())}")
    p.add_argument("--dtype", help="float32, float16 or bfloat16 (default: the checkpoint's)")
    p.add_argument("--weight-dtype", help=f"store weights narrower: float16 is {FLOAT16_SPEEDUP}")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--chat-template-file", help="a Jinja chat template replacing the checkpoint's")
    long = p.add_argument_group("long context: chunked prefill into a compressed memory")
    long.add_argument(
        "--schedule",
        help="full, fixed, im, imdc, or a plugin's (default: imdc when --policy is given, else full)",
    )
    long.add_argument(
        "--policy", help="none, streaming, snapkv, h2o, ..., or a plugin's (default: none; h2o with --reform)"
    )
    long.add_argument(
        "--memory", type=int, help=f"memory budget M in tokens, sinks excluded (default {DEFAULT_BUDGET})"
    )
    long.add_argument("--chunk", type=int, help=f"chunk size c in tokens (default {DEFAULT_BUDGET})")
    long.add_argument("--sinks", type=int, default=4, help="first tokens never evicted")
    long.add_argument("--positions", default="compact", help="compact (renumber each step) or original")
    long.add_argument(
        "--query-aware",
        action="store_true",
        help="read -f's document with the first question and compress by that question's attention",
    )
    long.add_argument(
        "--decode-memory", type=int, help="also keep the memory within this budget while generating"
    )
    long.add_argument("--policy-arg", action="append", default=[], metavar="KEY=VALUE", help="policy option")
    long.add_argument(
        "--schedule-arg", action="append", default=[], metavar="KEY=VALUE", help="e.g. shape=sqrt"
    )
    long.add_argument("--plugin", action="append", default=[], metavar="MODULE", help=PLUGIN_HELP)
    long.add_argument("--stats", action="store_true", help="print per-step prefill stats after each answer")
    reform = p.add_argument_group(
        "REFORM: read -f's document with the memory above, answer each question from an exact cache "
        "recomputed over the document tokens gathered for it"
    )
    reform.add_argument("--reform", action="store_true", help="answer by REFORM (needs -f)")
    reform.add_argument(
        "--reform-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"one of {', '.join(REFORM_OPTIONS)} (e.g. gather=2048)",
    )
    return p


def prefill_config(args: argparse.Namespace) -> PrefillConfig:
    for module in args.plugin:
        load_plugin(module)
    if args.reform_arg and not args.reform:
        raise ValueError("--reform-arg sets REFORM's options: add --reform")
    config = PrefillConfig(
        reform=reform_options(parse_options(args.reform_arg, "--reform-arg")) if args.reform else None,
        schedule=args.schedule,
        policy=args.policy,
        memory=DEFAULT_BUDGET if args.memory is None else args.memory,
        chunk=DEFAULT_BUDGET if args.chunk is None else args.chunk,
        sinks=args.sinks,
        positions=args.positions,
        policy_args=parse_options(args.policy_arg, "--policy-arg"),
        schedule_args=parse_options(args.schedule_arg, "--schedule-arg"),
        decode_memory=args.decode_memory,
    )
    # A budget or a chunk that nothing would use means the user expected compression: say so.
    if config.policy == NO_POLICY and config.decode_memory is None:
        if args.memory is not None:
            raise ValueError(
                f"--memory {args.memory} sets a compression budget, but no --policy chooses which tokens to "
                "keep: add one, e.g. --policy snapkv (or streaming, h2o, ...)"
            )
        if args.chunk is not None and config.schedule == FULL_SCHEDULE:
            raise ValueError(
                f"--chunk {args.chunk} splits the prompt only with a chunked --schedule (fixed, im, imdc) "
                "or a --policy (then imdc)"
            )
    return config


def reform_options(options: dict[str, object]) -> Reform:
    unknown = [key for key in options if key not in REFORM_OPTIONS]
    if unknown:
        raise ValueError(f"REFORM has no option {', '.join(unknown)}; options: {', '.join(REFORM_OPTIONS)}")
    return Reform(**options)


def sampling(args: argparse.Namespace) -> Sampling:
    return Sampling(
        temperature=args.temp,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repeat_penalty=args.repeat_penalty,
        repeat_last_n=args.repeat_last_n,
        seed=None if args.seed < 0 else args.seed,
    )


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
        f"tokens + {min(memory.sinks, memory.seen)} sinks ({memory.nbytes / 2**20:.1f} MiB)"
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
    template = Path(args.chat_template_file).read_text(encoding="utf-8") if args.chat_template_file else None
    document = Path(args.file).read_text(encoding="utf-8") if args.file else None
    print(f"loading {args.model or 'the default model'} ...", file=sys.stderr)
    llm = load(
        args.model,
        backend=args.backend,
        dtype=args.dtype,
        weight_dtype=args.weight_dtype,
        device=args.device,
        chat_template=template,
    )
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
    sys.exit(main())
