"""``python -m tools.convert_gguf SRC.gguf OUT_DIR``: a GGUF file into a checkpoint directory.

The conversion itself is ``engine.gguf.convert``; this is its command line.
"""

from __future__ import annotations

import sys
from pathlib import Path

from engine.cli import Parser, run_main
from engine.gguf import convert


def main(argv: list[str] | None = None) -> int:
    parser = Parser(
        prog="python -m tools.convert_gguf",
        description="Convert a Llama GGUF file into a checkpoint directory.",
    )
    parser.add_argument("src", type=Path, help="the .gguf file")
    parser.add_argument("out_dir", type=Path, help="the checkpoint directory to create (must not exist)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    def run() -> int:
        print(f"wrote {convert(args.src, args.out_dir, progress=not args.quiet)}")
        return 0

    return run_main(run, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
