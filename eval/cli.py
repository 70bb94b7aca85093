"""The ``precisim`` command line: ``eval``, ``sweep``, ``report``, ``layers``, ``cost``,
``perf``, ``search``, ``vectors``, ``formats`` and ``demo``.

Building the parser imports only light modules (the standard library and
:mod:`precisim.formats`); each command imports what it runs when it runs, so that
``precisim formats`` or ``precisim --help`` never load transformers, datasets, matplotlib or
the evaluation and model-patching machinery (``tests/test_cli.py`` checks this).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from precisim.eval import commands, cost_cli, train_cli, vectors_cli
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
    cost_cli.add_parsers(sub)
    formats_cli.add_parser(sub)
    demo.add_parser(sub)
    vectors_cli.add_parser(sub)
    train_cli.add_parser(sub)
    return parser


#: (module, class) of the errors that mean bad input, from modules that may not be imported
#: (a command imports what it runs): caught only if their module was loaded
_INPUT_ERRORS = (("sqlite3", "DatabaseError"), ("precisim.emulation.loader", "LoadError"),
                 ("precisim.emulation.opkinds", "EmulationError"))


def _input_errors() -> tuple[type[BaseException], ...]:
    out: list[type[BaseException]] = [ValueError, OSError]
    for mod, name in _INPUT_ERRORS:
        m = sys.modules.get(mod)
        if m is not None:
            out.append(getattr(m, name))
    return tuple(out)


def main(argv: list[str] | None = None) -> int:
    """Run ``precisim`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    Bad input gives one ``error: ...`` line on stderr naming the bad value and exit status 2
    (argparse's own errors exit 2 too, through ``SystemExit``), never a traceback (set
    ``PRECISIM_TRACEBACK=1`` to see one); Ctrl-C gives ``error: interrupted`` and status 130.
    Warnings are printed as ``warning: ...`` lines."""
    args = build_parser().parse_args(argv)
    # a command run as a program may restart itself (reproducible mode); called from Python
    # with an argv, it may not
    args.argv = list(sys.argv[1:]) if argv is None else None
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        return _run(args)


def _show_warning(message: Warning | str, *args: object, **kwargs: object) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _run(args: argparse.Namespace) -> int:
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        hint = getattr(args, "interrupt_hint", None)
        print("error: interrupted" + (f"; {hint}" if hint else ""), file=sys.stderr)
        return 130
    except _input_errors() as e:
        if os.environ.get("PRECISIM_TRACEBACK"):
            raise
        text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        if isinstance(e, OSError) and e.filename is not None and str(e.filename) not in text:
            text = f"{e.filename}: {text}"
        print(f"error: {text or type(e).__name__}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
