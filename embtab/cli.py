"""`embtab` command line: every command prints a one-line summary, or a JSON result with --json."""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Sequence

from embtab.commands import bench, data, demo, graphhash, serve, services, stream, train
from feature_store.wheels import DataError
from serving.errors import VersionNotFoundError

COMMAND_MODULES = (data, services, demo, train, stream, serve, graphhash, bench)
OUR_PACKAGES = frozenset(
    {"embtab", "embedding_tables", "feature_store", "models", "online_training", "serving"}
)
# What the user can fix from the message alone: bad input (our typed ValueErrors), a data set
# that cannot be fetched or read, a model that has no published version yet.
USER_ERRORS = (ValueError, DataError, VersionNotFoundError)


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
    # torchrec asks torch.fx whether it is tracing, and torch answers with a one-time notice to
    # torchrec's developers ("is_fx_tracing will return true for ..."): nothing a user can act on.
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    try:
        return arguments.run(arguments) or 0
    except KeyboardInterrupt:
        print("embtab: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if is_user_error(error):
            print(f"embtab: error: {error}", file=sys.stderr)
            return 2
        # A service that failed (Redis, Kafka, a rank) or a bug: where it happened matters.
        traceback.print_exc(file=sys.stderr)
        print(f"embtab: error: {error}", file=sys.stderr)
        return 1


def is_user_error(error: BaseException) -> bool:
    """A bad-input error that our code raised, reported in one line; a ValueError raised inside
    a library (numpy, torch, ...) is a bug of ours and gets its traceback."""
    if not isinstance(error, USER_ERRORS):
        return False
    frame = error.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    raised_in = type(error).__module__ if frame is None else frame.tb_frame.f_globals["__name__"]
    return raised_in.split(".")[0] in OUR_PACKAGES


if __name__ == "__main__":
    sys.exit(main())
