"""Checkpoint faults on a real file system: a directory that refuses writes, a disk that fills
up mid-write, and a checkpoint whose bytes were corrupted after it was written.

Each must end in a CheckpointError that says what was wrong, with the previous checkpoint intact
and no scratch file left behind.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from models.checkpoint import load_checkpoint, save_checkpoint
from models.errors import CheckpointError
from tests.serving.serving_helpers import tiny_model

REPO = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def read_only(directory: Path) -> Iterator[None]:
    """The directory made unwritable: mode 0555, and, for root (whom modes do not stop), the
    immutable attribute; skips if neither stops a write here."""
    directory.chmod(0o555)
    immutable = False
    try:
        probe = directory / ".probe"
        with contextlib.suppress(OSError):
            probe.write_bytes(b"")
        if probe.exists():
            probe.unlink()
            immutable = subprocess.run(["chattr", "+i", str(directory)], capture_output=True)
            immutable = immutable.returncode == 0
            if not immutable:
                pytest.skip("cannot make a directory read-only for this user here")
        yield
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(directory)], check=True)
        directory.chmod(0o755)


def test_a_read_only_directory_is_a_clear_error_and_the_old_checkpoint_stays(tmp_path):
    directory = tmp_path / "checkpoints"
    path = save_checkpoint(directory / "model.safetensors", tiny_model("hash", seed=0))
    before = path.read_bytes()
    with read_only(directory), pytest.raises(CheckpointError, match="could not write") as error:
        save_checkpoint(path, tiny_model("hash", seed=1))
    assert str(path) in str(error.value) and "unchanged" in str(error.value)
    assert isinstance(error.value, OSError)
    assert path.read_bytes() == before
    assert sorted(p.name for p in directory.iterdir()) == ["model.safetensors"]


# Saves a bigger model under a file size limit: the write fails part way, as on a full disk
# (EFBIG instead of ENOSPC: the same failed write(2), without needing a small file system).
FULL_DISK = textwrap.dedent(
    """
    import resource, signal, sys
    from models.checkpoint import save_checkpoint
    from models.errors import CheckpointError
    from tests.serving.serving_helpers import tiny_model
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    limit = int(sys.argv[2])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    try:
        save_checkpoint(sys.argv[1], tiny_model("qr", seed=1))
    except CheckpointError as error:
        print(type(error).__name__, error)
        sys.exit(3)
    """
)


def test_a_disk_that_fills_up_mid_write_is_a_clear_error_and_the_old_checkpoint_stays(tmp_path):
    path = save_checkpoint(tmp_path / "model.safetensors", tiny_model("hash", seed=0))
    before = path.read_bytes()
    child = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(path), str(len(before) // 2)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == 3, child.stderr[-3000:]
    assert child.stdout.startswith("CheckpointWriteError could not write")
    assert "File too large" in child.stdout and "unchanged" in child.stdout
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
    load_checkpoint(path)


def _data_start(path: Path) -> int:
    """Where a safetensors file's tensor bytes begin (after its length-prefixed JSON header)."""
    with path.open("rb") as handle:
        return 8 + int.from_bytes(handle.read(8), "little")


def test_flipped_bytes_in_the_tensors_are_refused_not_loaded(tmp_path):
    model = tiny_model("hash", seed=0)
    path = save_checkpoint(tmp_path / "model.safetensors", model)
    data = bytearray(path.read_bytes())
    start = _data_start(path)
    data[(start + len(data)) // 2] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum") as error:
        load_checkpoint(path)
    assert str(path) in str(error.value)


def test_a_corrupted_header_is_refused_with_a_typed_error(tmp_path):
    path = save_checkpoint(tmp_path / "model.safetensors", tiny_model("hash", seed=0))
    data = bytearray(path.read_bytes())
    data[_data_start(path) - 2] = ord("x")  # inside the JSON header's closing braces
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(path)


def test_an_intact_checkpoint_still_loads_bit_for_bit(tmp_path):
    model = tiny_model("qr", seed=0)
    path = save_checkpoint(tmp_path / "model.safetensors", model)
    loaded = load_checkpoint(path).model
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
