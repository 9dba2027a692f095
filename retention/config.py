"""Config files on the command line: each named in its errors, and ``config:`` includes expanded into layers.

A ``fit`` config may name parent configs (``config: ../demo.yaml`` or a list, relative to the file); each parent's
keys apply first, then the file's own. The commands check every ``-c/--config`` file before parsing it, so a file
that is not YAML is reported by name rather than by a bare parser traceback.
"""

from __future__ import annotations

from pathlib import Path

import yaml


class ConfigFileError(ValueError):
    """A config file that cannot be read (not YAML, or files that include each other); names the file."""


def config_file_values(argv: list[str]) -> list[str]:
    """The values of every ``-c FILE``, ``--config FILE`` and ``--config=FILE`` in ``argv``."""
    values = [v for flag, v in zip(argv, argv[1:]) if flag in ("-c", "--config")]
    return values + [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]


def names_a_file(value: str) -> bool:
    """Whether a ``--config`` value is a file's path (rather than YAML text, which may be too long for a path)."""
    try:
        return Path(value).is_file()
    except OSError:
        return False


def read_yaml(path: Path) -> object:
    """The content of the YAML file ``path``; raises :class:`ConfigFileError` naming it when it is not YAML."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigFileError(f"--config {path}: not valid YAML: {err}") from None


def check_config_files(argv: list[str]) -> None:
    """Raise :class:`ConfigFileError` naming a ``-c/--config`` file of ``argv`` that is not valid YAML."""
    for value in config_file_values(argv):
        if names_a_file(value):
            read_yaml(Path(value))


def config_layers(path: Path, seen: tuple[Path, ...] = ()) -> list[str]:
    """``--config`` values for a config file: its ``config:`` parents first (paths relative to the file; each
    parent's own parents before it), then the file's other keys as one YAML text."""
    path = path.resolve()
    if path in seen:
        raise ConfigFileError(f"{path}: config files include each other ({' -> '.join(map(str, (*seen, path)))})")
    data = read_yaml(path)
    if not isinstance(data, dict) or "config" not in data:
        return [str(path)]
    parents = data.pop("config")
    layers: list[str] = []
    for parent in parents if isinstance(parents, list) else [parents]:
        layers += config_layers(path.parent / str(parent), (*seen, path))
    return [*layers, yaml.safe_dump(data, sort_keys=False)]


def expand_config_includes(argv: list[str]) -> list[str]:
    """``argv`` with every config file that names parents (``config: parent.yaml``) replaced by its layers.

    jsonargparse applies a group given as a mapping inside a file with parents (``run: {name: x}``) as the whole
    group, resetting the parent's other keys of that group to their defaults; as separate ``--config`` layers
    each key is merged over the parent's, as the dotted form (``run.name: x``) and consecutive ``--config`` files
    are."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        flag, value = (arg, argv[i + 1] if i + 1 < len(argv) else None) if arg in ("-c", "--config") else (None, None)
        if arg.startswith("--config="):
            flag, value = "--config", arg.split("=", 1)[1]
        if flag is not None and value is not None and names_a_file(value):
            for layer in config_layers(Path(value)):
                out += ["--config", layer]
            i += 1 if arg.startswith("--config=") else 2
            continue
        out.append(arg)
        i += 1
    return out
