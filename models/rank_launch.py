"""Running one function on N ranks: spawned processes in one gloo group on loopback, or this
process as one rank of torchrun's group.

Failure: every collective has the `timeout_s` of `init_process_group`, and when a rank dies the
launcher stops the others and raises RankFailedError naming it, within the timeout.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp

from models.errors import ModelConfigError


class DistributedError(RuntimeError):
    """Distributed training that could not run: a rank died, timed out, or could not start (a
    failure of the run, not of its input: bad settings are ModelConfigError)."""


class RankFailedError(DistributedError):
    """A rank exited with an error or was killed; the other ranks were stopped."""


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago (the caller binds it, and retries if
    another process took it in between)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _rank_main(
    rank: int,
    world_size: int,
    port: int,
    timeout_s: float,
    target: Callable[..., Any],
    args: tuple,
    results: str,
) -> None:
    """A spawned rank: join the group (bounded by timeout_s), run target, write its result, or
    its error for the launcher to report."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        result = target(*args)
        Path(results, f"rank-{rank}.json").write_text(json.dumps(_jsonable(result)))
    except BaseException as error:
        first_line = (str(error).strip().splitlines() or [""])[0][:300]
        Path(results, f"rank-{rank}.error").write_text(f"{type(error).__name__}: {first_line}")
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _jsonable(result: Any) -> Any:
    return result.__dict__ if dataclasses.is_dataclass(result) else result


def launch(target: Callable[..., Any], args: tuple, world_size: int, timeout_s: float) -> list[Any]:
    """Run `target(*args)` on `world_size` spawned ranks in one gloo group on loopback; the
    JSON results of every rank, in rank order. A rank that raises or dies stops the others and
    raises RankFailedError naming every failed rank and why, the first to fail first."""
    context = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="embtab-ranks-") as results:
        port = free_port()
        processes = [
            context.Process(
                target=_rank_main,
                args=(rank, world_size, port, timeout_s, target, args, results),
                daemon=False,
            )
            for rank in range(world_size)
        ]
        for process in processes:
            process.start()
        try:
            _wait(processes, timeout_s, Path(results))
        finally:
            for process in processes:
                if process.is_alive():
                    process.kill()
                process.join(5)
        return [
            json.loads(Path(results, f"rank-{rank}.json").read_text()) for rank in range(world_size)
        ]


# How long the other ranks get to fail by themselves (and say why) once one rank has failed.
SETTLE_SECONDS = 3.0


def _wait(processes: list[mp.Process], timeout_s: float, results: Path) -> None:
    """Until all exit 0. On the first failure the others get SETTLE_SECONDS to stop (gloo
    fails their pending collectives at once), then are killed; RankFailedError says why each
    failed. Ranks still running timeout_s + SETTLE_SECONDS after another finished are killed."""
    first_exit: float | None = None
    while True:
        codes = [process.exitcode for process in processes]
        if any(code not in (None, 0) for code in codes):
            deadline = time.monotonic() + SETTLE_SECONDS
            while any(p.is_alive() for p in processes) and time.monotonic() < deadline:
                time.sleep(0.05)
            for process in processes:
                if process.is_alive():
                    process.kill()
                process.join(5)
            raise RankFailedError(_failure_report(processes, results))
        if all(code == 0 for code in codes):
            return
        if any(code == 0 for code in codes):
            first_exit = first_exit or time.monotonic()
            if time.monotonic() - first_exit > timeout_s + SETTLE_SECONDS:
                stuck = [rank for rank, code in enumerate(codes) if code is None]
                for process in processes:
                    process.kill()
                raise RankFailedError(
                    f"rank(s) {stuck} of {len(processes)} still running "
                    f"{timeout_s + SETTLE_SECONDS:.0f} s after the others finished; killed"
                )
        time.sleep(0.1)


def _failure_report(processes: list[mp.Process], results: Path) -> str:
    """Every failed rank and why; a rank killed by a signal (it could write nothing) or the
    earliest written error first, since the others' errors follow from it."""
    failures = []
    for rank, process in enumerate(processes):
        error = results / f"rank-{rank}.error"
        if error.exists():
            failures.append((error.stat().st_mtime, f"rank {rank}: {error.read_text()}"))
        elif process.exitcode is not None and process.exitcode < 0:
            failures.append((0.0, f"rank {rank}: killed by signal {-process.exitcode}"))
        elif process.exitcode not in (None, 0):
            failures.append((0.0, f"rank {rank}: exited with status {process.exitcode}"))
    failures.sort()
    return (
        f"{len(failures)} of {len(processes)} ranks failed; the others were stopped: "
        + "; ".join(text for _, text in failures)
    )


def launched_by_torchrun() -> bool:
    """Whether this process is a rank started by torchrun (torch.distributed.run)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def torchrun_rank(
    target: Callable[..., Any], args: tuple, world_size: int, timeout_s: float
) -> Any:
    """Run `target(*args)` as this process's rank of torchrun's group (env:// rendezvous)."""
    world = int(os.environ["WORLD_SIZE"])
    if world != world_size:
        raise ModelConfigError(
            f"torchrun started {world} ranks but {world_size} were asked for; accepted: "
            "the same number (--nproc equal to torchrun's nnodes x nproc-per-node)"
        )
    dist.init_process_group(
        "gloo", init_method="env://", timeout=datetime.timedelta(seconds=timeout_s)
    )
    try:
        return target(*args)
    finally:
        dist.destroy_process_group()
