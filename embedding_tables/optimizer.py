"""The sparse optimizer: its config, and its step in torch ops for the torch lookup."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from embedding_tables.errors import ConfigError

SPARSE_OPTIMIZER_KINDS = ("rowwise_adagrad", "sgd")


@dataclass(frozen=True)
class SparseOptimizerConfig:
    """Row-wise Adagrad or SGD applied in backward to the rows a batch touched, and only those.

    `rowwise_adagrad` is fbgemm's EXACT_ROWWISE_ADAGRAD: per touched row, with g the row's
    gradient summed over the batch, acc += mean(g**2); w -= lr * g / (sqrt(acc) + eps); `acc`
    starts at `initial_accumulator_value`. `sgd`: w -= lr * g. `kind=None` means no fused
    optimizer: the tables are ordinary nn.Parameters for a dense optimizer (same as passing
    `optimizer=None` to EmbeddingCollection).
    """

    kind: str | None = "rowwise_adagrad"
    lr: float = 0.01
    eps: float = 1e-8
    initial_accumulator_value: float = 0.0

    def __post_init__(self) -> None:
        if self.kind is not None and self.kind not in SPARSE_OPTIMIZER_KINDS:
            raise ConfigError(
                f"unknown sparse optimizer kind {self.kind!r}; accepted: "
                f"{', '.join(SPARSE_OPTIMIZER_KINDS)} or None"
            )
        if not self.lr > 0:
            raise ConfigError(f"sparse optimizer lr must be > 0, got {self.lr}")
        if not self.eps > 0:
            raise ConfigError(f"sparse optimizer eps must be > 0, got {self.eps}")
        if not self.initial_accumulator_value >= 0:
            raise ConfigError(
                "sparse optimizer initial_accumulator_value must be >= 0, got "
                f"{self.initial_accumulator_value}"
            )


def sparse_step(
    weight: torch.Tensor,
    momentum: torch.Tensor | None,
    indices: torch.Tensor,
    grads: torch.Tensor,
    config: SparseOptimizerConfig,
    lr: float,
) -> None:
    """One step of `config` (with learning rate `lr`) in place on the rows of `weight` that
    `indices` reads, given each index's gradient `grads` [N, dim]: the gradients of a row are
    summed first, then the row is updated once, in fp32, as fbgemm's EXACT_ROWWISE_ADAGRAD /
    EXACT_SGD do. `momentum` [rows] fp32 is the row-wise Adagrad accumulator (None for SGD)."""
    rows, inverse = torch.unique(indices, return_inverse=True)
    summed = torch.zeros(rows.numel(), grads.shape[1], dtype=torch.float32, device=grads.device)
    summed.index_add_(0, inverse, grads.float())
    updated = weight.index_select(0, rows).float()
    if config.kind == "rowwise_adagrad":
        accumulator = momentum.index_select(0, rows) + summed.pow(2).mean(dim=1)
        momentum.index_copy_(0, rows, accumulator)
        updated -= (lr / (accumulator.sqrt() + config.eps)).unsqueeze(1) * summed
    else:
        updated -= lr * summed
    weight.index_copy_(0, rows, updated.to(weight.dtype))
