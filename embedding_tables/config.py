"""TableConfig: one logical embedding table and the compression method behind it."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from embedding_tables.errors import ConfigError
from embedding_tables.methods import Method, method_class, method_names

POOLINGS = ("sum", "mean")
DTYPES = ("fp32", "fp16")
# The fields every table has, whatever its method; the rest of a flat form are method options.
COMMON_FIELDS = ("name", "num_embeddings", "dim", "method", "budget", "pooling", "dtype", "seed")


@dataclass(frozen=True)
class TableConfig:
    """One logical table: what ids it takes, how wide its rows are, how it is compressed.

    `num_embeddings` is the logical cardinality (ids 0..num_embeddings-1 for methods that index
    rows by id; the size of the uncompressed baseline for every method). `method` is the
    method with its options (`embedding_tables.methods`, e.g. `QR(combine="add")`); a method's
    name stands for it with default options (`method="qr"`). `budget` is the memory the table
    may spend: a float in (0, 1] is a fraction of the full table's bytes, an int (>= 2) a number
    of full-width rows; None means the method's natural size (the full table for `full`,
    `hash` and `unified`). `seed` seeds every hash the method computes.
    """

    name: str
    num_embeddings: int
    dim: int
    method: Method | str = "full"
    budget: float | int | None = None
    pooling: str = "sum"
    dtype: str = "fp32"
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("TableConfig.name must be a non-empty string")
        if self.num_embeddings < 1:
            raise ConfigError(
                f"table {self.name!r}: num_embeddings must be >= 1, got {self.num_embeddings}"
            )
        if self.dim < 1:
            raise ConfigError(f"table {self.name!r}: dim must be >= 1, got {self.dim}")
        if isinstance(self.method, str):
            try:
                object.__setattr__(self, "method", method_class(self.method)())
            except ConfigError as error:
                raise ConfigError(f"table {self.name!r}: {error}") from None
        elif not isinstance(self.method, Method):
            raise ConfigError(
                f"table {self.name!r}: method must be a method's name or options "
                f"(embedding_tables.methods), got {self.method!r}; names: "
                f"{', '.join(method_names())}"
            )
        _check_choice(self.name, "pooling", self.pooling, POOLINGS)
        _check_choice(self.name, "dtype", self.dtype, DTYPES)
        _check_budget(self.name, self.budget)
        self.method.check_table(self)

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any], *, strict: bool = True) -> TableConfig:
        """A table from its flat form, as config files and checkpoint manifests write it: the
        common fields, `method` by name, and that method's options beside them.

        An option of another method is refused (`qr` with `capacity`), unless `strict` is False:
        then it is dropped (manifests written before methods had their own options held every
        method's options, the inapplicable ones without effect)."""
        name = fields.get("name", "?")
        method_name = fields.get("method", "full")
        try:
            method = method_class(method_name)
        except ConfigError as error:
            raise ConfigError(f"table {name!r}: {error}") from None
        own = {field.name for field in dataclasses.fields(method)}
        unknown = sorted(set(fields) - set(COMMON_FIELDS) - own)
        if unknown and strict:
            accepted = ", ".join(sorted(own)) or "none"
            raise ConfigError(
                f"table {name!r}: option(s) {', '.join(map(repr, unknown))} do not apply to "
                f"method {method_name!r}; its options: {accepted}"
            )
        options = {key: value for key, value in fields.items() if key in own}
        common = {key: value for key, value in fields.items() if key in COMMON_FIELDS}
        try:
            common["method"] = method(**options)
        except ConfigError as error:
            raise ConfigError(f"table {name!r}: {error}") from None
        except TypeError as error:
            raise ConfigError(f"table {name!r}: {error}") from None
        return cls(**common)

    def to_fields(self) -> dict[str, Any]:
        """The flat form `from_fields` reads."""
        fields = {key: getattr(self, key) for key in COMMON_FIELDS}
        fields["method"] = self.method.name
        fields.update(self.method.options())
        return fields

    @property
    def full_bytes(self) -> int:
        """Bytes of the uncompressed baseline: one row per logical id."""
        return self.num_embeddings * self.dim * (4 if self.dtype == "fp32" else 2)

    def budget_rows(self) -> int:
        """Physical rows the budget allows at this table's dim (the whole full table if None)."""
        if self.budget is None:
            return self.num_embeddings
        if isinstance(self.budget, int):
            return self.budget
        return max(0, int(self.num_embeddings * self.budget))


def _check_budget(table: str, budget: object) -> None:
    if budget is None:
        return
    if isinstance(budget, bool) or not isinstance(budget, int | float):
        raise ConfigError(
            f"table {table!r}: budget must be a fraction in (0, 1] (a float) or a number of rows "
            f"(an int >= 2), got {budget!r}"
        )
    if isinstance(budget, float) and not 0.0 < budget <= 1.0:
        raise ConfigError(f"table {table!r}: a fractional budget must be in (0, 1], got {budget}")
    if isinstance(budget, int) and budget < 2:
        raise ConfigError(
            f"table {table!r}: an int budget is a number of rows and must be >= 2, got "
            f"{budget}; write 1.0 for the full table's memory"
        )


def _check_choice(table: str, option: str, value: str, accepted: tuple[str, ...]) -> None:
    if value not in accepted:
        raise ConfigError(
            f"table {table!r}: unknown {option} {value!r}; accepted: {', '.join(accepted)}"
        )
