"""``backup``: a copy of the database, read through whole first."""

from __future__ import annotations

import argparse

from engine.cli.common import EXIT_OK, store


def add_backup(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    backup = sub.add_parser("backup", parents=[common], help="copy the database, read through whole, to a backup file")
    backup.add_argument("--to", metavar="PATH", help="file or folder (default: beside the database, keeping the newest 3)")
    backup.set_defaults(handler=cmd_backup)


def cmd_backup(args: argparse.Namespace) -> int:
    print(f"backed up to {store(args).backup(args.to)}")
    return EXIT_OK
