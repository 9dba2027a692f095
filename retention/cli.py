"""The ``retention`` console script: one jsonargparse parser with a subcommand per module of
``retention.commands`` (``fit`` is a LightningCLI and parses its own arguments).

A command module provides ``ARGS`` (a dataclass whose attribute docstrings are its ``--help``), ``parser()``
(usually :func:`command_parser` of ``ARGS``) and ``execute(args) -> int``. Every command but ``fit`` and
``study`` takes ``-c/--config FILE.yaml`` and ``--print_config`` (whose output ``-c`` reads back); ``study``'s
``-c/--config`` is its study file.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
import typing
from pathlib import Path
from typing import Any, Literal

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace, set_parsing_settings
from jsonargparse.typing import restricted_string_type

COMMANDS = {
    "probe": "Score a model on a knowledge set under the probe protocols.",
    "edit": "Edit facts into a model and report edit success.",
    "locate": "Causal tracing: find the layers that recall facts.",
    "fit": "Edit, fine-tune and measure retention (LightningCLI; -c file.yaml).",
    "study": "Run a whole study (arms x seeds, or single edits) resumably; -c study.yaml.",
    "report": "Retention with confidence intervals over study or run folders.",
}

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


def build_parser(command: str | None = None) -> ArgumentParser:
    """The ``retention`` parser; only ``command``'s subparser is built in full (the others import heavy modules)."""
    from retention import __version__

    parser = ArgumentParser(prog="retention", version=__version__, allow_abbrev=False,
                            description="How well does knowledge edited into a language model survive fine-tuning?")
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


def _list_fields(args_cls: type) -> set[str]:
    """Names of the fields typed ``list[...]`` (or ``list[...] | None``)."""
    hints = typing.get_type_hints(args_cls)
    out = set()
    for f in dataclasses.fields(args_cls):
        hint = hints[f.name]
        options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, _UnionType) else (hint,)
        if any(typing.get_origin(o) is list for o in options):
            out.add(f.name)
    return out


_UnionType = type(int | None)


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


def check_config_files(argv: list[str]) -> None:
    """Raise :class:`UsageError` naming a ``-c/--config`` file that is not valid YAML (jsonargparse's message
    does not name it)."""
    import yaml

    values = [v for flag, v in zip(argv, argv[1:]) if flag in ("-c", "--config")]
    values += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    for value in values:
        if Path(value).is_file():
            try:
                yaml.safe_load(Path(value).read_text(encoding="utf-8"))
            except yaml.YAMLError as err:
                raise UsageError(f"--config {value}: not valid YAML: {err}") from None


def to_args(args_cls: type, ns: Namespace) -> Any:
    """The dataclass ``args_cls`` from a parsed namespace (dropping ``config`` and other parser-only keys)."""
    values = ns.as_dict()
    return args_cls(**{f.name: values[f.name] for f in dataclasses.fields(args_cls) if f.name in values})


def main(argv: list[str] | None = None) -> int:
    """Run ``retention <command> ...``; returns the exit status (parse errors and ``--help`` exit via SystemExit)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    name = argv[0] if argv else None
    if name == "fit":
        return int(_module("fit").main(argv[1:]) or 0)
    if name is None:
        build_parser().print_help()
        return 0
    if not name.startswith("-") and name not in COMMANDS:
        print(f"retention: unknown command '{name}'; choose from {', '.join(COMMANDS)} "
              "(retention --help lists them)", file=sys.stderr)
        return 2
    parser = build_parser(name)
    module = _module(name) if name in COMMANDS else None
    if module is not None:
        argv = [name, *comma_lists(argv[1:], _list_fields(module.ARGS))]
    try:
        check_config_files(argv[1:])
    except UsageError as err:
        print(f"retention {name}: error: {err}", file=sys.stderr)
        return 2
    cfg = parser.parse_args(argv)
    module = module or _module(cfg.command)
    args = to_args(module.ARGS, cfg[cfg.command])
    try:
        return int(module.execute(args) or 0)
    except UsageError as err:
        print(f"retention {cfg.command}: error: {err}", file=sys.stderr)
        return 2
