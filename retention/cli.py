"""The ``retention`` console script: one jsonargparse parser with a subcommand per module of
``retention.commands`` (``fit`` is a LightningCLI and parses its own arguments; see
:mod:`retention.commands.options` for what a command module provides).

Every command but ``fit`` and ``study`` takes ``-c/--config FILE.yaml`` and ``--print_config`` (whose output
``-c`` reads back); ``study``'s ``-c/--config`` is its study file. A user error found before any work is one line
on stderr and exit status 2; ``fit`` and ``study`` print any other error as one line too (exit 1), and
``--debug`` (or ``-v``) anywhere on the command line shows the traceback instead.
"""

from __future__ import annotations

import importlib
import sys
import threading
from collections.abc import Callable

from jsonargparse import ArgumentError, ArgumentParser

from retention.commands.options import UsageError, comma_lists, list_fields, to_args
from retention.config import ConfigFileError, check_config_files

COMMANDS = {
    "probe": "Score a model on a knowledge set under the probe protocols.",
    "edit": "Edit facts into a model and report edit success.",
    "locate": "Causal tracing: find the layers that recall facts.",
    "fit": "Edit, fine-tune and measure retention (LightningCLI; -c file.yaml).",
    "study": "Run a whole study (arms x seeds, or single edits) resumably; -c study.yaml.",
    "report": "Retention with confidence intervals over study or run folders.",
    "cache": "Check every disk-cache entry in full (retention cache verify).",
}
DEBUG_FLAGS = ("--debug", "-v")
"""Show the traceback of an error rather than its one-line message."""
ONE_LINE_ERRORS = ("fit", "study")
"""Commands whose every error is one line without ``--debug``."""


def build_parser(command: str | None = None) -> ArgumentParser:
    """The ``retention`` parser; only ``command``'s subparser is built in full (the others import heavy modules)."""
    from retention import __version__

    parser = ArgumentParser(prog="retention", version=__version__, allow_abbrev=False,
                            description="How well does knowledge edited into a language model survive fine-tuning? "
                                        "--debug (or -v) shows the traceback of an error.")
    subcommands = parser.add_subcommands(required=True, dest="command")
    for name, help_ in COMMANDS.items():
        if name == command and name != "fit":
            sub = _module(name).parser()
        else:
            sub = ArgumentParser(description=help_, allow_abbrev=False)
        subcommands.add_subcommand(name, sub, help=help_)
    return parser


def _module(name: str):
    return importlib.import_module(f"retention.commands.{name}")


def run_command(name: str, call: Callable[[], int | None], debug: bool,
                started: threading.Event | None = None) -> int:
    """``call()``'s exit status; a :class:`UsageError` (or, for ``fit``, any error before its work started) is
    printed as one line and gives 2; another error of ``fit``/``study`` is printed as one line and gives 1,
    unless ``debug``."""
    try:
        return int(call() or 0)
    except UsageError as err:
        if debug:
            raise
        print(f"retention {name}: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        if debug or name not in ONE_LINE_ERRORS:
            raise
        before_work = started is not None and not started.is_set()
        if before_work:
            # A parse error spreads "Parser key ...:" and its reason over lines.
            message = " ".join(str(err).split()) if isinstance(err, ArgumentError) else err
            print(f"retention {name}: error: {message}", file=sys.stderr)
            return 2
        print(f"retention {name}: error: {type(err).__name__}: {err}\n(--debug shows the traceback)", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    """Run ``retention <command> ...``; returns the exit status (parse errors and ``--help`` exit via SystemExit)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = any(a in DEBUG_FLAGS for a in argv)
    argv = [a for a in argv if a not in DEBUG_FLAGS]
    name = argv[0] if argv else None
    if name is None:
        build_parser().print_usage(sys.stderr)
        print(f"retention: error: give a command: {', '.join(COMMANDS)} (retention --help describes them)",
              file=sys.stderr)
        return 2
    if name == "fit":
        from retention.commands.fit import main as fit_main

        started = threading.Event()
        return run_command(name, lambda: fit_main(argv[1:], started), debug, started)
    if not name.startswith("-") and name not in COMMANDS:
        print(f"retention: unknown command '{name}'; choose from {', '.join(COMMANDS)} "
              "(retention --help lists them)", file=sys.stderr)
        return 2
    parser = build_parser(name)
    module = _module(name) if name in COMMANDS else None
    if module is not None:
        argv = [name, *comma_lists(argv[1:], list_fields(module.ARGS))]
    try:
        check_config_files(argv[1:])
    except ConfigFileError as err:
        print(f"retention {name}: error: {err}", file=sys.stderr)
        return 2
    cfg = parser.parse_args(argv)
    module = module or _module(cfg.command)
    args = to_args(module.ARGS, cfg[cfg.command])
    return run_command(cfg.command, lambda: module.execute(args), debug)
