"""The fused Triton kernels' logic on CPU under Triton's interpreter, in a fresh process.

Triton reads TRITON_INTERPRET when it is imported, and torchrec imports it while the other test
modules are collected, so `kernels_interpreter_cases.py` runs in a child pytest started with
TRITON_INTERPRET=1; the variable never reaches this process or the other tests. Skipped, with
the reason, where Triton is not installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

CASES = Path(__file__).with_name("kernels_interpreter_cases.py")
ROOT = Path(__file__).resolve().parents[2]
CHILD_TIMEOUT_S = 300


def test_kernels_match_the_reference_under_the_interpreter() -> None:
    pytest.importorskip(
        "triton",
        reason="Triton is not installed (pip install -e '.[dev]'); the kernel tests need it",
    )
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CASES)]
    result = subprocess.run(
        command,
        cwd=ROOT,
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
    )
    summary = result.stdout.strip().splitlines()[-1:] or ["(no output)"]
    assert result.returncode == 0, (
        f"{' '.join(command)} failed ({summary[0]}):\n{result.stdout[-12000:]}\n"
        f"{result.stderr[-4000:]}"
    )
    assert " passed" in summary[0] and "skipped" not in summary[0], summary[0]
