"""The ``retention`` console script: one entry point, one module per subcommand."""

from __future__ import annotations

import importlib
import sys
from typing import TypeVar

from jsonargparse import ArgumentParser, set_parsing_settings

Args = TypeVar("Args")

COMMANDS = {
    "probe": "Score a model on a knowledge set under the probe protocols.",
    "edit": "Edit facts into a model and report edit success.",
    "locate": "Causal tracing: find the layers that recall facts.",
    "fit": "Edit, fine-tune and measure retention (LightningCLI; --config file.yaml).",
    "study": "Run a whole study (arms x seeds, or single edits) resumably; --config study.yaml.",
    "report": "Retention with confidence intervals over study or run folders.",
}


def parse_args(args_cls: type[Args], argv: list[str], prog: str, description: str | None) -> Args:
    """Parse ``argv`` into the dataclass ``args_cls``; its attribute docstrings become the ``--help`` text."""
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    parser = ArgumentParser(prog=prog, description=description)
    parser.add_class_arguments(args_cls, nested_key=None)
    return args_cls(**parser.parse_args(argv).as_dict())


def _usage() -> str:
    lines = ["usage: retention <command> [options]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, help_ in COMMANDS.items()]
    lines += ["", "Run 'retention <command> --help' for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"retention: unknown command '{name}'\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"retention.commands.{name}")
    result = module.main(rest)
    return int(result or 0)
