"""What the command modules share: their parser (a typed dataclass whose attribute docstrings are ``--help``),
the option types they have in common, and :class:`UsageError`, the one-line error that exits 2.

A command module provides ``ARGS`` (its dataclass), ``parser()`` (usually :func:`command_parser` of ``ARGS``) and
``execute(args) -> int``; :mod:`retention.cli` dispatches to it.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from collections.abc import Callable
from typing import Any, Literal

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace, set_parsing_settings
from jsonargparse.typing import restricted_string_type

Device = restricted_string_type("Device", r"^(auto|cpu|cuda(:[0-9]+)?)$")
"""``auto`` (cuda when available, else cpu), ``cpu``, ``cuda`` or ``cuda:i``."""
OnError = Literal["raise", "skip"]
Protocol = Literal["top1", "prob", "token_acc", "gen"]


class UsageError(ValueError):
    """A bad option found after parsing, before any model is loaded: ``retention`` prints it and exits 2."""


def check_device(device: str) -> None:
    """Raise :class:`UsageError` naming ``--device`` when this machine lacks ``device``."""
    from retention.models import resolve_device

    try:
        resolve_device(device)
    except ValueError as err:
        raise UsageError(f"--device: {err}") from None


def command_parser(args_cls: type, description: str | None, config: bool = True,
                   skip: set[str] | None = None) -> ArgumentParser:
    """A subcommand's parser: the fields of the dataclass ``args_cls`` (help from their attribute docstrings) and,
    with ``config``, ``-c/--config`` and ``--print_config``."""
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    parser = ArgumentParser(description=description, allow_abbrev=False)
    if config:
        parser.add_argument("-c", "--config", action=ActionConfigFile,
                            help="A YAML file of these options (as --print_config writes it); later flags override it.")
    parser.add_class_arguments(args_cls, nested_key=None, skip=skip or set())
    return parser


_UnionType = type(int | None)


def list_fields(args_cls: type) -> set[str]:
    """Names of the fields typed ``list[...]`` (or ``list[...] | None``)."""
    hints = typing.get_type_hints(args_cls)
    out = set()
    for f in dataclasses.fields(args_cls):
        hint = hints[f.name]
        options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, _UnionType) else (hint,)
        if any(typing.get_origin(o) is list for o in options):
            out.add(f.name)
    return out


def comma_lists(argv: list[str], list_fields: set[str]) -> list[str]:
    """``--protocols top1,prob`` -> ``--protocols [top1,prob]``: list options also take comma-separated values."""
    flags = {f"--{name}" for name in list_fields}
    out = list(argv)
    for i, arg in enumerate(out):
        flag, eq, value = arg.partition("=")
        if flag in flags and eq and not value.lstrip().startswith("["):
            out[i] = f"{flag}=[{value}]"
        elif arg in flags and i + 1 < len(out) and not out[i + 1].lstrip().startswith(("[", "-")):
            out[i + 1] = f"[{out[i + 1]}]"
    return out


def to_args(args_cls: type, ns: Namespace) -> Any:
    """The dataclass ``args_cls`` from a parsed namespace (dropping ``config`` and other parser-only keys)."""
    values = ns.as_dict()
    return args_cls(**{f.name: values[f.name] for f in dataclasses.fields(args_cls) if f.name in values})


def run_main(name: str, args_cls: type, parser: Callable[[], ArgumentParser], execute: Callable[[Any], int | None],
             argv: list[str]) -> int:
    """``retention <name> ARGV`` in this process, as the console script runs it: a config file's YAML error or a
    :class:`UsageError` is one line on stderr and exit status 2 (parse errors exit through SystemExit)."""
    from retention.config import ConfigFileError, check_config_files

    try:
        check_config_files(argv)
        args = to_args(args_cls, parser().parse_args(comma_lists(argv, list_fields(args_cls))))
        return int(execute(args) or 0)
    except (UsageError, ConfigFileError) as err:
        print(f"retention {name}: error: {err}", file=sys.stderr)
        return 2
