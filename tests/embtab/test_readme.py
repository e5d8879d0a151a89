"""The README's Python code runs as written: a new user's first copy-paste must work."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def readme_python_blocks() -> list[str]:
    return PYTHON_BLOCK.findall(README.read_text(encoding="utf-8"))


def test_readme_has_python_examples() -> None:
    assert readme_python_blocks(), "the README lost its Python example"


def test_readme_python_blocks_run_as_written(tmp_path: Path) -> None:
    """Each block runs in a fresh interpreter, in a directory of its own, with nothing defined
    beforehand: what a user gets by pasting it into a file."""
    for number, block in enumerate(readme_python_blocks(), start=1):
        script = tmp_path / f"readme_block_{number}.py"
        script.write_text(block, encoding="utf-8")
        finished = subprocess.run(
            [sys.executable, str(script)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert finished.returncode == 0, (
            f"README Python block {number} failed:\n{block}\n--- stderr ---\n{finished.stderr}"
        )
