"""What a benchmark ran on: every results file records it the same way."""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path

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
