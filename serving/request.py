"""The body of `POST /score`, checked field by field before anything is scored.

    {"model": "dcn-ml1m",                       optional; must be the model this service serves
     "user_id": 42,
     "context": {"age": 3, "user_activity": 2.1},   optional; user and context features
     "candidates": [{"item_id": 7, "features": {"release_year": 50, "genres": [1, 4]}}, ...]}

A feature value is an id (one id), a list of ids (a bag or a sequence, oldest first) or a
number (a dense feature). For a model with a preprocessing artifact, ids are raw values, strings
or ints as in the source files (serving.raw_values turns them into the model's ids first);
otherwise they are the prepared integer ids. A value given in the request wins over the online
feature store's, which wins over the default (an empty bag, 0.0 for dense). Every problem is
reported with the path of the field it is in: malformed JSON is a 400, a missing or wrongly
typed field a 422, an unknown feature or an id the model's table does not accept a 400, too many
candidates a 413.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, NotRequired

import numpy as np
import pydantic
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    StrictFloat,
    StrictInt,
    StrictStr,
    WithJsonSchema,
    with_config,
)
from typing_extensions import TypedDict  # pydantic takes typing's only from Python 3.12

from feature_store.schema import FeatureSpec, Schema
from serving.errors import FeatureValueError, RequestError, TooManyCandidatesError
from serving.jagged import Jagged

if TYPE_CHECKING:  # embedding_tables imports torch, which the body parser's worker does without
    from embedding_tables.config import TableConfig

INT64_MIN = -(2**63) + 2  # the two smallest int64s mark empty/deleted slots of id maps
INT64_MAX = 2**63 - 1


def _raw_id(value: object) -> int | str:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"an id is an integer or a string, got {value!r}")
    return value


def _feature_value(value: object) -> object:
    if isinstance(value, list):
        return [_raw_id(item) for item in value]
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(
            f"a feature value is an integer or string id, a list of ids or a number, got {value!r}"
        )
    return value


_ID_SCHEMA = {"anyOf": [{"type": "integer"}, {"type": "string"}]}
# Raw values as in the source files (serving.raw_values); ints alone for a model trained
# without a preprocessing artifact. One validator each, so an error names the field itself.
RawId = Annotated[int | str, PlainValidator(_raw_id), WithJsonSchema(_ID_SCHEMA)]
FeatureValue = Annotated[
    int | float | str | list[int | str],
    PlainValidator(_feature_value),
    WithJsonSchema(
        {
            "anyOf": [
                *_ID_SCHEMA["anyOf"],
                {"type": "number"},
                {"type": "array", "items": _ID_SCHEMA},
            ]
        }
    ),
]


class RequestShapeError(RequestError):
    """A body that is not JSON, or a field that is missing or of the wrong type (422)."""

    status = 422


class Candidate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    item_id: RawId
    features: dict[str, FeatureValue] = Field(default_factory=dict)


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    user_id: RawId
    context: dict[str, FeatureValue] = Field(default_factory=dict)
    candidates: list[Candidate] = Field(min_length=1)


# The fast parse: the same JSON parser (pydantic's) with every value's type checked by pydantic
# itself instead of a Python validator per value, into plain dicts instead of a model per
# candidate. It accepts a subset of what ScoreRequest accepts (bools are refused as ScoreRequest
# refuses them); whatever it refuses goes through ScoreRequest, which gives the error (or, if it
# accepts it after all, the values): answers and errors are ScoreRequest's either way.
_StrictId = StrictInt | StrictStr
_StrictValue = StrictInt | StrictFloat | StrictStr | list[StrictInt | StrictStr]


@with_config(ConfigDict(extra="forbid"))
class _CandidateBody(TypedDict):
    item_id: _StrictId
    features: NotRequired[dict[str, _StrictValue]]


@with_config(ConfigDict(extra="forbid"))
class _ScoreBody(TypedDict):
    model: NotRequired[StrictStr | None]
    user_id: _StrictId
    context: NotRequired[dict[str, _StrictValue]]
    candidates: Annotated[list[_CandidateBody], Field(min_length=1)]


_FAST_BODY = pydantic.TypeAdapter(_ScoreBody)


@dataclass
class RequestValues:
    """A valid body's values gathered per feature, in one pass over the candidates: what raw-value
    encoding (serving.raw_values) and the model's checks (`request_columns`) take. `features`:
    name -> (positions of the candidates that give it, their values), names in order of first
    appearance. `user_known` / `item_known`: whether the user's and each item's raw id maps to a
    row (set by the encoder; None: all do). `raw_user_id` / `raw_item_ids`: the raw ids the
    online store is keyed by, None where one is not known (set by the encoder; `raw_item_ids`
    None: not encoded, the ids are the raw ids, for a model without an artifact)."""

    model: str | None
    user_id: int | str
    item_ids: list[int | str]
    context: dict[str, object]
    features: dict[str, tuple[list[int], list[object]]]
    user_known: bool = True
    item_known: np.ndarray | None = None
    raw_user_id: int | str | None = None
    raw_item_ids: list[int | str | None] | None = None

    @property
    def num_candidates(self) -> int:
        return len(self.item_ids)

    @classmethod
    def of(cls, request: ScoreRequest | dict) -> RequestValues:
        """The values of a ScoreRequest, or of a body as the fast parse gives it (a dict)."""
        body = request.model_dump() if isinstance(request, ScoreRequest) else request
        candidates = body["candidates"]
        features: dict[str, tuple[list[int], list[object]]] = {}
        for position, candidate in enumerate(candidates):
            for name, value in candidate.get("features", {}).items():
                positions, values = features.setdefault(name, ([], []))
                positions.append(position)
                values.append(value)
        return cls(
            model=body.get("model"),
            user_id=body["user_id"],
            item_ids=[candidate["item_id"] for candidate in candidates],
            context=body.get("context", {}),
            features=features,
        )


def parse_request(body: bytes, max_candidates: int) -> RequestValues:
    """Validate a raw body; raises RequestError (400/413/422) naming the field at fault."""
    try:
        values = RequestValues.of(_FAST_BODY.validate_json(body))
    except pydantic.ValidationError:
        values = RequestValues.of(validate_request(body))
    if values.num_candidates > max_candidates:
        raise TooManyCandidatesError(
            "candidates",
            f"{values.num_candidates} candidates; at most {max_candidates} per request",
        )
    return values


def validate_request(body: bytes) -> ScoreRequest:
    """The body as a ScoreRequest (the schema's own validation, slower than `parse_request`'s
    fast path); raises RequestError (400/422) naming the field at fault."""
    try:
        return ScoreRequest.model_validate_json(body)
    except pydantic.ValidationError as error:
        first = error.errors(include_url=False)[0]
        location = _path(first["loc"])
        if first["type"] == "json_invalid":
            raise RequestError("body", f"not valid JSON ({first['msg']})") from None
        if first["type"] == "model_type" and not first["loc"]:
            raise RequestShapeError("body", "must be a JSON object") from None
        message = first["msg"]
        if first["type"] == "missing" and first["loc"][-1] in ROLE_FIELDS:
            message += (
                f"; {ROLE_FIELDS[first['loc'][-1]]} goes in {first['loc'][-1]!r}, whatever the "
                "data set's column is called"
            )
        raise RequestShapeError(location or "body", message) from None


# The two fields a request names by role: the data set's user and item columns (`roles:` in
# its spec) may be called anything, and a body that uses those names is told where they go.
ROLE_FIELDS = {"user_id": "the user's id", "item_id": "each candidate's item id"}


def _path(location: tuple) -> str:
    path = ""
    for part in location:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


@dataclass(frozen=True)
class FeatureRule:
    """What a request may send for one feature of the model."""

    spec: FeatureSpec
    bounded: bool  # ids must lie in [0, cardinality): the table does not take others


def feature_rules(
    schema: Schema, tables: dict[str, TableConfig], feature_to_table: dict[str, str]
) -> dict[str, FeatureRule]:
    """Per feature of the model: ids bounded iff its table errors on out-of-range ids."""
    rules = {}
    for spec in schema.features:
        table = tables.get(feature_to_table.get(spec.name, ""))
        bounded = table is not None and table.method.bounded_ids()
        rules[spec.name] = FeatureRule(spec, bounded)
    return rules


@dataclass
class RequestColumns:
    """One request's values as columns over its candidates, plus what it left to the store."""

    user_id: int
    num_candidates: int
    item_ids: np.ndarray
    sparse: dict[str, tuple[Jagged, np.ndarray]]  # feature -> (values per candidate, given mask)
    dense: dict[str, tuple[np.ndarray, np.ndarray]]  # feature -> (values, given mask)
    # Whether the user's and each item's raw id maps to a row (serving.raw_values); an id that
    # does not is an empty bag in the model's input.
    user_known: bool = True
    item_known: np.ndarray | None = None
    # The raw ids the online store is keyed by (the ids themselves for a model without an
    # artifact); None where a raw id is not known (a prepared out-of-vocabulary id).
    raw_user_id: int | str | None = None
    raw_item_ids: list[int | str | None] | None = None

    def known_items(self) -> np.ndarray:
        if self.item_known is None:
            return np.ones(self.num_candidates, dtype=bool)
        return self.item_known


def request_columns(
    request: RequestValues, rules: dict[str, FeatureRule], user_column: str, item_column: str
) -> RequestColumns:
    """The request's feature values as per-candidate columns; FeatureValueError names the field
    of an unknown feature, a value of the wrong kind or an id the model does not accept."""
    count = request.num_candidates
    item_ids = _id_lists(
        request.item_ids,
        lambda index: f"candidates[{index}].item_id",
        _id_rule(rules, item_column),
    ).values
    _id_lists([request.user_id], lambda _: "user_id", _id_rule(rules, user_column))

    sparse: dict[str, tuple[Jagged, np.ndarray]] = {}
    dense: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    everyone = np.ones(count, dtype=bool)
    for name, value in request.context.items():
        where = f"context.{name}"
        rule = _rule(rules, where, name, (user_column, item_column))
        if rule.spec.kind == "dense":
            number = _dense_values([value], lambda _, where=where: where)[0]
            dense[name] = (np.full(count, number, np.float32), everyone)
        else:
            row = _id_lists([value], lambda _, where=where: where, rule)
            sparse[name] = (row.take(np.zeros(count, dtype=np.int64)), everyone)

    for name, (positions, values) in request.features.items():

        def field(index: int, name: str = name, positions: list[int] = positions) -> str:
            return f"candidates[{positions[index]}].features.{name}"

        rule = _rule(rules, field(0), name, (user_column, item_column))
        mask = np.zeros(count, dtype=bool)
        mask[positions] = True
        if rule.spec.kind == "dense":
            column = np.zeros(count, dtype=np.float32)
            column[positions] = _dense_values(values, field)
            dense[name] = _overlay(dense.get(name), column, mask)
            continue
        given_rows = _id_lists(values, field, rule)
        lengths = np.zeros(count, dtype=np.int64)
        lengths[positions] = given_rows.lengths
        column = Jagged(given_rows.values, lengths)
        previous = sparse.get(name)
        if previous is not None:
            column = column.where(mask, previous[0])
            mask = mask | previous[1]
        sparse[name] = (column, mask)
    encoded = request.raw_item_ids is not None  # by the artifact's encoder
    return RequestColumns(
        request.user_id,
        count,
        item_ids,
        sparse,
        dense,
        request.user_known,
        request.item_known,
        raw_user_id=request.raw_user_id if encoded else request.user_id,
        raw_item_ids=request.raw_item_ids if encoded else item_ids.tolist(),
    )


def _overlay(
    previous: tuple[np.ndarray, np.ndarray] | None, values: np.ndarray, mask: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    if previous is None:
        return values, mask
    return np.where(mask, values, previous[0]).astype(np.float32), mask | previous[1]


def _rule(
    rules: dict[str, FeatureRule], field: str, name: str, id_columns: tuple[str, str]
) -> FeatureRule:
    rule = rules.get(name)
    if rule is None or name in id_columns:
        accepted = sorted(set(rules) - set(id_columns))
        reason = "is given by user_id / item_id" if name in id_columns else "is not a feature"
        raise FeatureValueError(
            field,
            f"{name!r} {reason} of this model; accepted features: {', '.join(accepted)}",
        )
    return rule


def _dense_values(values: list[object], field: Callable[[int], str]) -> np.ndarray:
    """Numbers of a dense feature as float32; FeatureValueError at the first that is not one."""
    for index, value in enumerate(values):
        if isinstance(value, list | str):
            raise RequestShapeError(
                field(index), f"a dense feature takes one number, got {value!r}"
            )
    numbers = np.array(values, dtype=np.float64)
    bad = ~np.isfinite(numbers) | (np.abs(numbers) > np.finfo(np.float32).max)
    if bad.any():
        index = int(np.argmax(bad))
        raise FeatureValueError(field(index), f"{values[index]!r} is not a finite float32 number")
    return numbers.astype(np.float32)


def _id_lists(values: list[object], field: Callable[[int], str], rule: FeatureRule) -> Jagged:
    """Ids of a categorical or sequence feature, one row per value (an int or a list of ints);
    FeatureValueError names the first value the model does not accept."""
    spec = rule.spec
    if all(type(value) is int for value in values):  # the common case: one id each
        lengths = np.ones(len(values), dtype=np.int64)
        flat = values
    else:
        rows: list[list[int]] = []
        for index, value in enumerate(values):
            if isinstance(value, float):
                raise FeatureValueError(
                    field(index),
                    f"feature {spec.name!r} takes integer ids, got the number {value!r}",
                )
            row = value if isinstance(value, list) else [value]
            if any(isinstance(item, str) for item in row):
                raise RequestShapeError(
                    field(index),
                    f"feature {spec.name!r} takes integer ids: this model was trained without a "
                    "preprocessing artifact (prepare the data set from a spec to score raw ids)",
                )
            if len(row) > spec.max_length:
                if spec.kind != "sequence":
                    raise FeatureValueError(
                        field(index),
                        f"feature {spec.name!r} takes at most {spec.max_length} id(s) per "
                        f"candidate, got {len(row)}",
                    )
                row = row[-spec.max_length :]
            rows.append(row)
        lengths = np.fromiter((len(row) for row in rows), dtype=np.int64, count=len(rows))
        flat = [item for row in rows for item in row]
    try:
        ids = np.array(flat, dtype=np.int64)
    except OverflowError:
        ids = None
    if ids is None or (ids.size and ids.min() < INT64_MIN):
        bad = next(i for i, item in enumerate(flat) if not INT64_MIN <= item <= INT64_MAX)
        raise FeatureValueError(
            field(_row_of(lengths, bad)), f"ids must be int64 values in [{INT64_MIN}, {INT64_MAX}]"
        )
    if rule.bounded and ids.size:
        outside = (ids < 0) | (ids >= spec.cardinality)
        if outside.any():
            bad = int(np.argmax(outside))
            raise FeatureValueError(
                field(_row_of(lengths, bad)),
                f"id {int(ids[bad])} is unknown to feature {spec.name!r}; accepted: ids in "
                f"[0, {spec.cardinality})",
            )
    return Jagged(ids, lengths)


def _row_of(lengths: np.ndarray, flat_index: int) -> int:
    return int(np.searchsorted(np.cumsum(lengths), flat_index, side="right"))


def _id_rule(rules: dict[str, FeatureRule], column: str) -> FeatureRule:
    """The rule of the user or item id column; any int64 if the model does not use it."""
    rule = rules.get(column)
    if rule is not None:
        return rule
    return FeatureRule(FeatureSpec(column or "id", "categorical", 1), bounded=False)
