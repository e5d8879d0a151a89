"""A study's results file: one JSON document, rewritten atomically after every cell.

Shape (the benchmarks' shared one): `{"machine": {...}, "command": "...", "date": "...",
"results": [...one record per cell...], "summary": {...}}`, plus `settings` (what every cell
depends on besides its method, budget and seed) and `invocations` (every command that added to
the file, with its date and machine load). Each write goes to a temporary file in the same
directory that is then renamed over the old one, so a killed run leaves either the previous
complete document or the new one, never a torn one; rerunning skips the cells already done.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fbgemm_gpu
import numpy as np
import sknetwork
import torch
import torchrec

from embtab.compression.errors import StudyConfigError

DONE = "done"
SKIPPED = "skipped"


def machine() -> dict[str, Any]:
    """The host the numbers were measured on: CPU, cores, threads, load, GPU, versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if "model name" in line]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads_used": torch.get_num_threads(),
        "load_average_1min_at_start": round(os.getloadavg()[0], 2),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "fbgemm_gpu": getattr(fbgemm_gpu, "__version__", "unknown"),
            "torchrec": getattr(torchrec, "__version__", "unknown"),
            "numpy": np.__version__,
            "scikit-network": sknetwork.__version__,
        },
    }


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


class ResultsFile:
    """The results of one study on disk; `record` adds (or replaces) one cell and rewrites."""

    def __init__(
        self,
        path: Path,
        document: dict[str, Any],
        summarize: Callable[[list[dict[str, Any]]], dict[str, float]],
    ) -> None:
        self.path = path
        self.document = document
        self.summarize = summarize

    @classmethod
    def open(
        cls,
        path: str | Path,
        settings: dict[str, Any],
        command: str,
        summarize: Callable[[list[dict[str, Any]]], dict[str, float]],
        restart: bool = False,
    ) -> ResultsFile:
        """The file at `path`, to resume, or a new document if there is none (or `restart`).

        StudyConfigError if the file holds results of other settings, or is not a results
        document: nothing is overwritten unless `restart` says so.
        """
        path = Path(path)
        settings = json.loads(json.dumps(settings))  # as it reads back: tuples are lists
        host = machine()
        invocation = {
            "command": command,
            "date": now(),
            "load_average_1min": host["load_average_1min_at_start"],
        }
        if path.exists() and not restart:
            document = _read(path)
            if document["settings"] != settings:
                raise StudyConfigError(
                    f"{path} holds results of other settings ({_difference(document, settings)}); "
                    "rerun with the same settings to resume it, or pass --restart to replace it "
                    "(or --out for another directory)"
                )
        else:
            document = {"settings": settings, "invocations": [], "results": [], "summary": {}}
        document["invocations"].append(invocation)
        document.update(machine=host, command=command, date=invocation["date"])
        results = cls(path, document, summarize)
        results.write()
        return results

    @property
    def records(self) -> list[dict[str, Any]]:
        return self.document["results"]

    def done(self) -> set[str]:
        """Keys of the cells that finished (skipped cells are decided again on every run)."""
        return {record["cell"] for record in self.records if record["status"] == DONE}

    def record(self, record: dict[str, Any]) -> None:
        """Add one cell's record (replacing an earlier one of the same cell) and write."""
        kept = [r for r in self.records if r["cell"] != record["cell"]]
        self.document["results"] = [*kept, record]
        self.write()

    def note_invocation(self, **fields: Any) -> None:
        """Add `fields` (e.g. the seconds it took) to this run's entry in `invocations`."""
        self.document["invocations"][-1].update(fields)
        self.write()

    def write(self) -> None:
        """Atomically: a temporary file beside the target, flushed to disk, renamed over it."""
        self.document["date"] = now()
        self.document["summary"] = self.summarize(self.records)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, scratch = tempfile.mkstemp(
            prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent
        )
        try:
            os.fchmod(descriptor, 0o644)  # mkstemp's 0600 would make the results private
            with os.fdopen(descriptor, "w") as handle:
                json.dump(self.document, handle, indent=1, sort_keys=True)
                handle.write("\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(scratch, self.path)
        except BaseException:
            Path(scratch).unlink(missing_ok=True)
            raise


def _read(path: Path) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise StudyConfigError(
            f"{path} is not a readable results document ({error}); pass --restart to replace it"
        ) from error
    needed = ("settings", "results", "invocations")
    if not isinstance(document, dict) or any(key not in document for key in needed):
        raise StudyConfigError(
            f"{path} is not a study results document (it lacks {', '.join(needed)}); pass "
            "--restart to replace it"
        )
    return document


def _difference(document: dict[str, Any], settings: dict[str, Any]) -> str:
    old = document.get("settings") or {}
    keys = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
    return "; ".join(f"{k}: file {old.get(k)!r}, now {settings.get(k)!r}" for k in keys)
