"""The ``precisim`` command line: ``eval``, ``sweep``, ``report``, ``layers``, ``vectors``,
``formats`` and ``demo``.

Building the parser imports only light modules (the standard library and
:mod:`precisim.formats`); each command imports what it runs when it runs, so that
``precisim formats`` or ``precisim --help`` never load transformers, datasets, matplotlib or
the evaluation and model-patching machinery (``tests/test_cli.py`` checks this).
"""

from __future__ import annotations

import argparse
import sys

from precisim.eval import commands, vectors_cli
from precisim.formats import cli as formats_cli
from precisim.formats import demo


def build_parser() -> argparse.ArgumentParser:
    """The ``precisim`` argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="precisim",
        description="Bit-accurate number formats and accelerator arithmetic for LLM co-design.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    commands.add_parsers(sub)
    formats_cli.add_parser(sub)
    demo.add_parser(sub)
    vectors_cli.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``precisim`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    args = build_parser().parse_args(argv)
    # a command run as a program may restart itself (reproducible mode); called from Python
    # with an argv, it may not
    args.argv = list(sys.argv[1:]) if argv is None else None
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
