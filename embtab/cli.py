"""`embtab` command line: every command prints a one-line summary, or a JSON result with --json."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from embtab.commands import bench, data, demo, graphhash, serve, services, stream, train
from embtab.config import ConfigFileError
from feature_store.schema import SchemaError
from feature_store.wheels import DataError
from models.errors import ModelError

COMMAND_MODULES = (data, services, demo, train, stream, serve, graphhash, bench)
USER_ERRORS = (DataError, SchemaError, ModelError, ConfigFileError, ValueError, *stream.ERRORS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="embtab",
        description="Compressed embedding tables: batch and streaming training, Redis serving.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    arguments = parser.parse_args(argv)
    try:
        return arguments.run(arguments) or 0
    except USER_ERRORS as error:
        print(f"embtab: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("embtab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
