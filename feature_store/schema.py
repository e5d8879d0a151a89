"""The feature schema every other package is built from."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

KINDS = ("categorical", "dense", "sequence")


class SchemaError(ValueError):
    """A schema or feature spec that is inconsistent; the message says what is accepted."""


@dataclass(frozen=True)
class FeatureSpec:
    """One input feature.

    `cardinality` is the number of distinct ids (ids are 0..cardinality-1 after preparation) for
    categorical and sequence features, and 0 for dense ones. A sequence feature holds up to
    `max_length` ids of the categorical feature named by `shares_ids_with` (a user's last items
    share the item id space, and so the item table). A `hashed` feature's ids are raw 64-bit
    ids (any int64, see feature_store.artifact): `cardinality` is then the number of distinct ids
    seen when it was prepared, and only tables whose method needs no vocabulary (hash, unified,
    collisionless) can take them.
    """

    name: str
    kind: str
    cardinality: int = 0
    max_length: int = 1
    shares_ids_with: str | None = None
    hashed: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise SchemaError(
                f"feature {self.name!r}: unknown kind {self.kind!r}; accepted: {', '.join(KINDS)}"
            )
        if self.kind in ("categorical", "sequence") and self.cardinality < 1:
            raise SchemaError(
                f"feature {self.name!r}: a {self.kind} feature needs cardinality >= 1, "
                f"got {self.cardinality}"
            )
        if self.kind == "sequence" and self.max_length < 1:
            raise SchemaError(
                f"feature {self.name!r}: a sequence feature needs max_length >= 1, "
                f"got {self.max_length}"
            )


@dataclass(frozen=True)
class Schema:
    """The features of one data set, its label and its event-time column."""

    dataset: str
    features: tuple[FeatureSpec, ...]
    label: str = "label"
    time_column: str = "timestamp"
    id_columns: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = [f.name for f in self.features]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise SchemaError(f"schema {self.dataset!r}: duplicate feature names {duplicates}")
        by_name = {f.name: f for f in self.features}
        for spec in self.features:
            if spec.shares_ids_with is None:
                continue
            target = by_name.get(spec.shares_ids_with)
            if target is None or target.kind != "categorical":
                raise SchemaError(
                    f"feature {spec.name!r} shares ids with {spec.shares_ids_with!r}, "
                    "which is not a categorical feature of this schema"
                )

    def feature(self, name: str) -> FeatureSpec:
        for spec in self.features:
            if spec.name == name:
                return spec
        raise SchemaError(
            f"schema {self.dataset!r} has no feature {name!r}; "
            f"features: {', '.join(f.name for f in self.features)}"
        )

    @property
    def categorical(self) -> list[FeatureSpec]:
        return [f for f in self.features if f.kind == "categorical"]

    @property
    def dense(self) -> list[FeatureSpec]:
        return [f for f in self.features if f.kind == "dense"]

    @property
    def sequence(self) -> list[FeatureSpec]:
        return [f for f in self.features if f.kind == "sequence"]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Schema:
        raw = json.loads(text)
        try:
            features = tuple(FeatureSpec(**f) for f in raw["features"])
            return cls(
                dataset=raw["dataset"],
                features=features,
                label=raw.get("label", "label"),
                time_column=raw.get("time_column", "timestamp"),
                id_columns=dict(raw.get("id_columns", {})),
            )
        except (KeyError, TypeError) as error:
            raise SchemaError(f"not a valid schema JSON: {error}") from error
