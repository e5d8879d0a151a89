"""TableConfig: one logical embedding table and the compression method behind it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from embedding_tables.errors import ConfigError

METHODS = ("full", "hash", "unified", "qr", "collisionless", "graphhash")
POOLINGS = ("sum", "mean")
DTYPES = ("fp32", "fp16")
QR_COMBINES = ("mult", "add", "concat")
OUT_OF_RANGE = ("error", "hash")
ADMISSIONS = ("exact", "cms")
EVICTIONS = ("lru", "lfu")
DEFAULT_ROWS = ("shared", "zeros")
GRAPHHASH_VARIANTS = ("single", "double")


@dataclass(frozen=True)
class TableConfig:
    """One logical table: what ids it takes, how wide its rows are, how it is compressed.

    `num_embeddings` is the logical cardinality (ids 0..num_embeddings-1 for `full`/`qr`;
    the size of the uncompressed baseline for every method). `budget` is either a fraction in
    (0, 1] of the full table's memory or, as an int > 1, an explicit number of physical rows;
    None means the method's natural size (the full table for `full`, `hash` and `unified`).
    Method options that do not apply to `method` keep their defaults.
    """

    name: str
    num_embeddings: int
    dim: int
    method: str = "full"
    budget: float | int | None = None
    pooling: str = "sum"
    dtype: str = "fp32"
    # hash / unified / graphhash fallback
    seed: int = 0
    # unified: lookups per feature (k_f); features not listed use 1
    feature_chunks: Mapping[str, int] = field(default_factory=dict)
    # qr
    combine: str = "mult"
    num_partitions: int = 2
    # full / qr: what to do with ids outside [0, num_embeddings)
    out_of_range: str = "error"
    # collisionless (Monolith)
    min_count: int = 1
    admission: str = "exact"
    ttl_seconds: float | None = None
    capacity: int | None = None
    eviction: str = "lru"
    default_row: str = "shared"
    # graphhash
    graphhash_variant: str = "single"

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("TableConfig.name must be a non-empty string")
        if self.num_embeddings < 1:
            raise ConfigError(
                f"table {self.name!r}: num_embeddings must be >= 1, got {self.num_embeddings}"
            )
        if self.dim < 1:
            raise ConfigError(f"table {self.name!r}: dim must be >= 1, got {self.dim}")
        _check_choice(self.name, "method", self.method, METHODS)
        _check_choice(self.name, "pooling", self.pooling, POOLINGS)
        _check_choice(self.name, "dtype", self.dtype, DTYPES)
        _check_choice(self.name, "combine", self.combine, QR_COMBINES)
        _check_choice(self.name, "out_of_range", self.out_of_range, OUT_OF_RANGE)
        _check_choice(self.name, "admission", self.admission, ADMISSIONS)
        _check_choice(self.name, "eviction", self.eviction, EVICTIONS)
        _check_choice(self.name, "default_row", self.default_row, DEFAULT_ROWS)
        _check_choice(self.name, "graphhash_variant", self.graphhash_variant, GRAPHHASH_VARIANTS)
        if self.budget is not None:
            if isinstance(self.budget, bool) or not isinstance(self.budget, int | float):
                raise ConfigError(
                    f"table {self.name!r}: budget must be a fraction in (0, 1] or an int number "
                    f"of rows > 1, got {self.budget!r}"
                )
            if isinstance(self.budget, float) and not 0.0 < self.budget <= 1.0:
                raise ConfigError(
                    f"table {self.name!r}: a fractional budget must be in (0, 1], got {self.budget}"
                )
            if isinstance(self.budget, int) and self.budget < 1:
                raise ConfigError(
                    f"table {self.name!r}: a budget in rows must be >= 1, got {self.budget}"
                )
        if self.num_partitions < 2:
            raise ConfigError(
                f"table {self.name!r}: num_partitions must be >= 2, got {self.num_partitions}"
            )
        if self.min_count < 1:
            raise ConfigError(f"table {self.name!r}: min_count must be >= 1, got {self.min_count}")
        if self.ttl_seconds is not None and self.ttl_seconds <= 0:
            raise ConfigError(
                f"table {self.name!r}: ttl_seconds must be > 0 or None, got {self.ttl_seconds}"
            )
        if self.capacity is not None and self.capacity < 1:
            raise ConfigError(f"table {self.name!r}: capacity must be >= 1, got {self.capacity}")
        for feature, chunks in self.feature_chunks.items():
            if chunks < 1:
                raise ConfigError(
                    f"table {self.name!r}: feature_chunks[{feature!r}] must be >= 1, got {chunks}"
                )

    @property
    def full_bytes(self) -> int:
        """Bytes of the uncompressed baseline: one row per logical id."""
        return self.num_embeddings * self.dim * (4 if self.dtype == "fp32" else 2)

    def budget_rows(self) -> int:
        """Physical rows the budget allows at this table's dim (the whole full table if None)."""
        if self.budget is None:
            return self.num_embeddings
        if isinstance(self.budget, int) and self.budget > 1:
            return self.budget
        return max(0, int(self.num_embeddings * float(self.budget)))


def _check_choice(table: str, option: str, value: str, accepted: tuple[str, ...]) -> None:
    if value not in accepted:
        raise ConfigError(
            f"table {table!r}: unknown {option} {value!r}; accepted: {', '.join(accepted)}"
        )
