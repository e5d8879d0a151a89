"""What a benchmark ran on: every results file records it the same way."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch

from models.checkpoint import library_versions


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_info(**other_versions: str) -> dict:
    """CPU, cores, torch threads, load at the start, GPU, and the library versions a checkpoint
    records plus any `other_versions` (e.g. a server binary's)."""
    versions = {**library_versions(), **other_versions}
    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1min_at_start": round(os.getloadavg()[0], 2),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "versions": versions,
    }


def write_results(path: Path, machine: dict, results: Any, summary: dict, **fields: Any) -> dict:
    """Write a benchmark's results file and print its summary: the machine, the command that ran,
    the date, then `fields` (its setup), its results and the summary. Written to a temporary file
    and renamed into place, so an interrupted run leaves the previous results whole."""
    document = {
        "machine": machine,
        "command": " ".join([os.path.relpath(sys.executable), *sys.argv]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        **fields,
        "results": results,
        "summary": summary,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(document, indent=2) + "\n")
    partial.replace(path)
    print(json.dumps(summary, indent=2))
    return document
