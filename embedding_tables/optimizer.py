"""The sparse optimizer config: the update fused into the embedding lookups' backward."""

from __future__ import annotations

from dataclasses import dataclass

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
