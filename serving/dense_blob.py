"""Dense blobs: one safetensors blob per dense revision holds the model's dense parameters, its
mapping state (GraphHash maps and the like) and each table's default row, so a reader never
mixes two dense revisions."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import safetensors.torch
import torch

from serving.errors import PublishError

DEFAULT_ROW_PREFIX = "embtab.default_row."


@dataclass(frozen=True)
class DenseState:
    """One dense revision: the model's dense tensors and each table's default row."""

    version: int
    revision: int
    tensors: dict[str, torch.Tensor]
    default_rows: dict[str, np.ndarray]


def float_rows(rows: Any) -> np.ndarray:
    if isinstance(rows, torch.Tensor):
        rows = rows.detach().to("cpu", torch.float32).numpy()
    return np.asarray(rows, dtype=np.float32)


def dense_blob(tensors: Mapping[str, torch.Tensor], default_rows: Mapping[str, Any]) -> bytes:
    """The safetensors bytes of one dense revision (default rows under DEFAULT_ROW_PREFIX)."""
    payload = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
    for table, row in default_rows.items():
        payload[DEFAULT_ROW_PREFIX + table] = torch.as_tensor(float_rows(row)).reshape(-1)
    clash = [name for name in tensors if name.startswith(DEFAULT_ROW_PREFIX)]
    if clash:
        raise PublishError(f"dense tensor names may not start with {DEFAULT_ROW_PREFIX!r}: {clash}")
    return safetensors.torch.save(payload)


def parse_dense_blob(version: int, revision: int, blob: bytes) -> DenseState:
    """A dense blob's tensors, with the default rows taken out into their own dict."""
    tensors = safetensors.torch.load(blob)
    defaults = {
        name[len(DEFAULT_ROW_PREFIX) :]: tensors.pop(name).numpy().astype(np.float32)
        for name in list(tensors)
        if name.startswith(DEFAULT_ROW_PREFIX)
    }
    return DenseState(version, revision, tensors, defaults)
