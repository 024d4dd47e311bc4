"""`hire <verb>`: the parser, assembled from the verbs in ``hire.commands``, and ``main``.

Errors a user can fix (HireError, ValueError, FileNotFoundError) print ``hire: error: <message>``
and return 2 (``-v`` adds the traceback); anything else, a RuntimeError from inside torch for one,
is a bug or an environment problem and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback

from hire.commands import VERBS
from hire.commands._args import Parser, UsageError
from hire.errors import HireError


def make_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="hire", description="HiRE: high-recall approximate top-k for faster LLM decoding")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details; tracebacks with errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="VERB")
    for verb, module in VERBS.items():
        p = sub.add_parser(verb, help=module.HELP, description=module.DESCRIPTION)
        module.add_arguments(p)
        p.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = make_parser().parse_args(argv)
    except UsageError as err:
        err.parser.print_usage(sys.stderr)
        print(f"{err.parser.prog}: error: {err.message}", file=sys.stderr)
        return 2
    args.argv = argv  # --tp relaunches the same command under torchrun
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="hire: %(message)s")
    try:
        return args.run(args)
    except (HireError, ValueError, FileNotFoundError) as err:
        if args.verbose:
            traceback.print_exc()
        print(f"hire: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
