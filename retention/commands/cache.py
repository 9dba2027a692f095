"""``retention cache verify``: check every entry of the disk cache in full (SHA-256 of every data file).

    retention cache verify                          # $RETENTION_CACHE or ~/.cache/retention
    retention cache verify --folder /scratch/cache --remove true

A read checks the sizes of an entry's files and hashes the small ones; a large file (covariances, converted
models) is hashed on read only when its modification stamp moved. This command hashes everything, lists the
entries that fail and exits 1 when there is one (docs/formats.md, "Disk cache").
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from retention.commands.options import command_parser, run_main


@dataclass
class CacheArgs:
    """What to do with the disk cache."""

    action: Literal["verify"] = "verify"
    """``verify``: hash every entry's files and list the entries that fail their checks."""
    folder: str | None = None
    """The cache folder; default ``$RETENTION_CACHE`` or ``~/.cache/retention``."""
    remove: bool = False
    """Delete the entries that fail (the next run that needs one recomputes it)."""


ARGS = CacheArgs


def parser():
    p = command_parser(CacheArgs, __doc__.split("\n\n")[0], skip={"action"})
    p.add_argument("action", choices=["verify"], help="verify: hash every entry's files and list those that fail.")
    return p


def execute(args: CacheArgs) -> int:
    from retention.diskcache import remove_entry, verify_tree
    from retention.paths import cache_dir

    folder = Path(args.folder) if args.folder else cache_dir()
    if not folder.is_dir():
        print(f"retention cache: no cache folder {folder}", file=sys.stderr)
        return 2
    checked, corrupt = 0, []
    for record, problem in verify_tree(folder):
        checked += 1
        if problem is not None:
            corrupt.append(record)
            print(f"corrupt: {record}: {problem}" + ("; removed" if args.remove else ""))
            if args.remove:
                remove_entry(record)
    print(f"{folder}: {checked} entries checked, {len(corrupt)} corrupt"
          + ("" if not corrupt or args.remove else " (--remove true deletes them; the next run recomputes them)"))
    return 1 if corrupt else 0


def main(argv: list[str]) -> int:
    """``retention cache ARGV``."""
    return run_main("cache", ARGS, parser, execute, argv)
