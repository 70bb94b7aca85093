"""The ``precisim`` command line: ``eval``, ``sweep``, ``report``, ``layers``, ``vectors``,
``formats`` and ``demo``."""

from __future__ import annotations

import argparse
import sys

from precisim.eval import commands, demo, vectors
from precisim.formats import cli as formats_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="precisim",
        description="Bit-accurate number formats and accelerator arithmetic for LLM co-design.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    commands.add_parsers(sub)
    formats_cli.add_parser(sub)
    demo.add_parser(sub)
    vectors.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
