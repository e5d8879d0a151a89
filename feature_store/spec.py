"""The data-set spec: a YAML or TOML file that describes a user's own Parquet or CSV files.

One documented format (docs/your-data.md). Every key is checked: an unknown key, a missing one or
a value of the wrong kind is a `SpecError` naming the key and what is accepted, raised before any
data is read. Paths in `source` and `joins` are relative to the spec file.

    name: my-clicks
    source: {format: csv, paths: ["logs/*.csv"], delimiter: ","}
    label: {column: clicked}                      # or {column: rating, op: ">=", value: 4}
    time: {column: ts, unit: ms}                  # s | ms | us | ns | iso8601
    roles: {user: user_id, item: item_id, request: request_id}
    features:
      - {name: user_id, kind: categorical, ids: hash}
      - {name: item_id, kind: categorical, min_count: 2}
      - {name: shop_id, kind: categorical, type: int, ids: index, cardinality: 5000}
      - {name: tags, kind: multi_valued, separator: "|", max_length: 8}
      - {name: price, kind: dense, transform: [log1p, standardise]}
      - {name: hist_item_id, kind: sequence, of: item_id, max_length: 20}
      - {name: user_activity, kind: count, of: user_id, transform: [log1p]}
    split: {by: time, valid: 0.1, test: 0.1}     # or {by: random, ..., seed: 0}
    fit_on: train                                 # or all

`fit_on: train` fits vocabularies and dense statistics on the events before the time of the
first event outside the train split (with a random split: on the train rows), so nothing from
validation or test leaks into them; `all` fits them on every event.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from feature_store.schema import SchemaError

FORMATS = ("csv", "tsv", "parquet")
TIME_UNITS = ("s", "ms", "us", "ns", "iso8601")
LABEL_OPS = (">=", ">", "<=", "<", "==", "!=")
FEATURE_KINDS = ("categorical", "multi_valued", "dense", "sequence", "count")
ID_MODES = ("vocabulary", "hash", "index")
RAW_TYPES = ("string", "int")
DENSE_TRANSFORMS = ("log1p", "standardise", "clip")
SPLIT_BY = ("time", "random")
FIT_ON = ("train", "all")
ROLES = ("user", "item", "request")


class SpecError(SchemaError):
    """A spec file that is malformed; the message names the key and what is accepted."""


@dataclass(frozen=True)
class SourceSpec:
    """Where the rows are: Parquet files, or CSV/TSV text (one or many files, globs allowed)."""

    format: str
    paths: tuple[str, ...]
    delimiter: str | None = None
    header: bool = True
    column_names: tuple[str, ...] = ()
    quote_char: str | None = '"'
    null_values: tuple[str, ...] = ("",)

    @property
    def field_delimiter(self) -> str:
        if self.delimiter is not None:
            return self.delimiter
        return "\t" if self.format == "tsv" else ","


@dataclass(frozen=True)
class JoinSpec:
    """A side file (users, items) whose columns are joined onto each event by a key column."""

    source: SourceSpec
    key: str
    columns: tuple[str, ...]


@dataclass(frozen=True)
class LabelSpec:
    """A 0/1 column, or a rule `column op value` (e.g. rating >= 4) that makes one."""

    column: str
    op: str | None = None
    value: float | None = None


@dataclass(frozen=True)
class TimeSpec:
    column: str
    unit: str = "s"


@dataclass(frozen=True)
class FeatureDef:
    """One model feature and how its raw values become model input.

    categorical / multi_valued: raw ids (`type` string or int) become ids through a vocabulary
    (sorted distinct values seen at least `min_count` times; values outside it get the
    out-of-vocabulary id, the last one, or are dropped when `oov` is false), through raw-id
    hashing to int64 (`ids: hash`, for tables whose method needs no vocabulary; `cardinality`
    optionally declares the table size to plan for, else the distinct ids seen), or as their
    own index (`ids: index`, integers that already are ids 0..cardinality-1, with `cardinality`
    declared: values outside are folded in modulo `cardinality`, a missing value gets the OOV
    id `cardinality`, or is dropped when `oov` is false). `index` keeps a data set whose ids
    are already dense (a generator's, a pre-folded log's) at its true table size without
    holding a vocabulary of millions of values.
    dense: a number, optionally clipped, log1p'd and standardised, in the order given.
    sequence: the user's previous `max_length` values of the categorical feature `of`, oldest
    first, in time order. count: how many earlier events share this event's value of `of`.
    """

    name: str
    kind: str
    column: str
    type: str = "string"
    ids: str = "vocabulary"
    min_count: int = 1
    oov: bool = True
    cardinality: int | None = None
    separator: str | None = None
    max_length: int = 1
    of: str | None = None
    transform: tuple[str, ...] = ()
    clip: tuple[float, float] | None = None

    @property
    def has_ids(self) -> bool:
        return self.kind in ("categorical", "multi_valued")

    @property
    def hashed(self) -> bool:
        return self.has_ids and self.ids == "hash"


@dataclass(frozen=True)
class SplitSpec:
    by: str = "time"
    valid: float = 0.1
    test: float = 0.1
    seed: int = 0


@dataclass(frozen=True)
class OnlineSpec:
    """What the online feature store keeps (feature_store.online): features per user and per
    item, and the user's behaviour sequence, keyed by the raw ids of roles.user and roles.item.
    A request then carries only the ids; the service reads the rest from the store."""

    user_features: tuple[str, ...] = ()
    item_features: tuple[str, ...] = ()
    sequence: str | None = None


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    source: SourceSpec
    label: LabelSpec
    time: TimeSpec
    features: tuple[FeatureDef, ...]
    roles: dict[str, str] = field(default_factory=dict)
    joins: tuple[JoinSpec, ...] = ()
    split: SplitSpec = SplitSpec()
    fit_on: str = "train"
    base_dir: str = "."
    online: OnlineSpec | None = None

    def feature(self, name: str) -> FeatureDef:
        for feature in self.features:
            if feature.name == name:
                return feature
        raise SpecError(
            f"spec {self.name!r} has no feature {name!r}; features: "
            f"{', '.join(f.name for f in self.features)}"
        )

    def to_json(self) -> str:
        """The spec as canonical JSON in the file's own shape (sorted keys): part of the
        artifact's content hash, and read back by `from_json`."""
        raw = asdict(self)
        raw["joins"] = [
            {**join["source"], "key": join["key"], "columns": join["columns"]}
            for join in raw["joins"]
        ]
        if raw["online"] is None:  # as specs were written before they could say it: same hash
            del raw["online"]
        return json.dumps(raw, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DatasetSpec:
        return parse_spec(json.loads(text), base_dir=None)


def load_spec(path: str | Path) -> DatasetSpec:
    """Read and check a spec file (`.yaml`, `.yml` or `.toml`)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise SpecError(f"cannot read spec file {path}: {error.strerror}") from error
    try:
        if path.suffix == ".toml":
            raw = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            raw = yaml.safe_load(text)
        else:
            raise SpecError(
                f"spec file {path}: unknown suffix {path.suffix!r}; accepted: .yaml, .yml, .toml"
            )
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as error:
        raise SpecError(f"spec file {path} does not parse: {error}") from error
    return parse_spec(raw, base_dir=str(path.resolve().parent))


def parse_spec(raw: Any, base_dir: str | None) -> DatasetSpec:
    """A DatasetSpec from parsed YAML/TOML/JSON; `base_dir` None keeps the one recorded in it."""
    top = _Mapping(raw, "spec")
    name = top.text("name")
    source = _source(top.mapping("source"), "source")
    label_map = top.mapping("label")
    label = LabelSpec(
        column=label_map.text("column"),
        op=label_map.choice("op", LABEL_OPS, default=None),
        value=label_map.number("value", default=None),
    )
    if (label.op is None) != (label.value is None):
        raise SpecError("label: `op` and `value` go together (e.g. op: '>=', value: 4)")
    label_map.done()
    time_map = top.mapping("time")
    time = TimeSpec(time_map.text("column"), time_map.choice("unit", TIME_UNITS, default="s"))
    time_map.done()
    roles_map = top.mapping("roles", default={})
    roles = {role: roles_map.text(role) for role in ROLES if role in roles_map.raw}
    roles_map.seen.update(ROLES)  # every role is accepted, given or not
    roles_map.done()
    joins = tuple(_join(item, f"joins[{i}]") for i, item in enumerate(top.list("joins", [])))
    features = tuple(
        _feature(item, f"features[{i}]") for i, item in enumerate(top.list("features"))
    )
    split_map = top.mapping("split", default={})
    split = SplitSpec(
        by=split_map.choice("by", SPLIT_BY, default="time"),
        valid=split_map.number("valid", default=0.1),
        test=split_map.number("test", default=0.1),
        seed=int(split_map.number("seed", default=0)),
    )
    split_map.done()
    if not (0 < split.valid < 1 and 0 < split.test < 1 and split.valid + split.test < 1):
        raise SpecError(
            f"split: valid {split.valid} and test {split.test} must be fractions with "
            "0 < valid, 0 < test and valid + test < 1 (every split needs rows)"
        )
    fit_on = top.choice("fit_on", FIT_ON, default="train")
    online = _online(top.mapping("online")) if "online" in top.raw else None
    top.seen.add("online")
    recorded_base = top.text("base_dir", default=".")
    top.done()
    spec = DatasetSpec(
        name=name,
        source=source,
        label=label,
        time=time,
        features=features,
        roles=roles,
        joins=joins,
        split=split,
        fit_on=fit_on,
        base_dir=base_dir if base_dir is not None else recorded_base,
        online=online,
    )
    _check(spec)
    return spec


def _online(online_map: _Mapping) -> OnlineSpec:
    online = OnlineSpec(
        user_features=tuple(online_map.strings("user_features", default=[])),
        item_features=tuple(online_map.strings("item_features", default=[])),
        sequence=online_map.text("sequence", default=None),
    )
    online_map.done()
    return online


def _check_online(
    online: OnlineSpec, by_name: dict[str, FeatureDef], roles: dict[str, str]
) -> None:
    if not {"user", "item"} <= roles.keys():
        raise SpecError(
            "online: the store is keyed by user and item ids; set roles.user and roles.item"
        )
    for group in ("user_features", "item_features"):
        for name in getattr(online, group):
            feature = by_name.get(name)
            if feature is None or feature.kind not in ("categorical", "multi_valued", "dense"):
                raise SpecError(
                    f"online.{group}: {name!r} must name a categorical, multi_valued or dense "
                    "feature of this spec (sequences and counts are built from the events)"
                )
    if online.sequence is not None:
        feature = by_name.get(online.sequence)
        if feature is None or feature.kind != "sequence":
            raise SpecError(
                f"online.sequence: {online.sequence!r} must name a sequence feature of this spec"
            )


def _check(spec: DatasetSpec) -> None:
    """Cross-field rules: unique names, references to existing features, roles."""
    names = [feature.name for feature in spec.features]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise SpecError(f"features: two features are named {duplicates}; names must be unique")
    by_name = {feature.name: feature for feature in spec.features}
    for feature in spec.features:
        if feature.name in ("label", "timestamp"):
            raise SpecError(
                f"feature {feature.name!r}: the names 'label' and 'timestamp' are reserved for "
                "the prepared label and event time; rename the feature"
            )
        if feature.kind in ("sequence", "count"):
            target = by_name.get(feature.of or "")
            if target is None or target.kind != "categorical":
                raise SpecError(
                    f"feature {feature.name!r}: `of` must name a categorical feature of this "
                    f"spec, got {feature.of!r}"
                )
        if feature.kind == "sequence" and "user" not in spec.roles:
            raise SpecError(
                f"feature {feature.name!r}: a sequence is per user; set roles.user to the "
                "column of user ids"
            )
    for role, column in spec.roles.items():
        if role in ("user", "item") and column not in by_name:
            raise SpecError(
                f"roles.{role}: {column!r} is not a feature of this spec; the {role} role "
                "names a categorical feature"
            )
        if role in ("user", "item") and by_name[column].kind != "categorical":
            raise SpecError(f"roles.{role}: feature {column!r} must be categorical")
    if spec.online is not None:
        _check_online(spec.online, by_name, spec.roles)
    joined = {column for join in spec.joins for column in join.columns}
    for join in spec.joins:
        if join.key in joined:
            raise SpecError(f"joins: key {join.key!r} is itself a joined column")


def _source(source: _Mapping, where: str) -> SourceSpec:
    file_format = source.choice("format", FORMATS)
    paths = source.raw.get("paths", source.raw.get("path"))
    if isinstance(paths, str):
        paths = [paths]
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) for p in paths):
        raise SpecError(f"{where}.paths: a file, a glob or a list of them (strings) is required")
    source.seen.update({"paths", "path"})
    quote = source.raw.get("quote_char", '"')
    source.seen.add("quote_char")
    if (
        quote is not None
        and quote is not False
        and not (isinstance(quote, str) and len(quote) == 1)
    ):
        raise SpecError(f"{where}.quote_char: one character, or null/false for no quoting")
    spec = SourceSpec(
        format=file_format,
        paths=tuple(paths),
        delimiter=source.text("delimiter", default=None),
        header=source.boolean("header", default=True),
        column_names=tuple(source.strings("column_names", default=[])),
        quote_char=quote or None,
        null_values=tuple(source.strings("null_values", default=[""])),
    )
    source.done()
    if spec.delimiter is not None and len(spec.delimiter) != 1:
        raise SpecError(f"{where}.delimiter: one character, got {spec.delimiter!r}")
    if not spec.header and not spec.column_names and spec.format != "parquet":
        raise SpecError(f"{where}: a file without a header needs `column_names`")
    return spec


def _join(raw: Any, where: str) -> JoinSpec:
    join = _Mapping(raw, where)
    source_keys = {
        "format",
        "paths",
        "path",
        "delimiter",
        "header",
        "column_names",
        "quote_char",
        "null_values",
    }
    source_raw = {key: value for key, value in join.raw.items() if key in source_keys}
    join.seen.update(source_keys)
    spec = JoinSpec(
        source=_source(_Mapping(source_raw, where), where),
        key=join.text("key"),
        columns=tuple(join.strings("columns")),
    )
    join.done()
    return spec


def _feature(raw: Any, where: str) -> FeatureDef:
    item = _Mapping(raw, where)
    name = item.text("name")
    where = f"feature {name!r}"
    item.where = where
    kind = item.choice("kind", FEATURE_KINDS)
    # multi_valued: 0 means "the longest list seen when preparing".
    defaults_max_length = 1 if kind in ("categorical", "dense", "count") else 0
    feature = FeatureDef(
        name=name,
        kind=kind,
        column=item.text("column", default=name),
        type=item.choice("type", RAW_TYPES, default="string"),
        ids=item.choice("ids", ID_MODES, default="vocabulary"),
        min_count=int(item.number("min_count", default=1)),
        oov=item.boolean("oov", default=True),
        cardinality=_optional_int(item.number("cardinality", default=None)),
        separator=item.text("separator", default=None),
        max_length=int(item.number("max_length", default=defaults_max_length)),
        of=item.text("of", default=None),
        transform=tuple(item.strings("transform", default=[])),
        clip=_clip(item.raw.get("clip"), where),
    )
    item.seen.add("clip")
    item.done()
    if kind == "sequence" and feature.max_length < 1:
        raise SpecError(f"{where}: a sequence feature needs max_length >= 1")
    if feature.max_length < 0:
        raise SpecError(f"{where}: max_length must be >= 1 (or left out: the longest seen)")
    if feature.min_count < 1:
        raise SpecError(f"{where}: min_count must be >= 1, got {feature.min_count}")
    unknown = [t for t in feature.transform if t not in DENSE_TRANSFORMS]
    if unknown:
        raise SpecError(
            f"{where}: unknown transform(s) {unknown}; accepted: {', '.join(DENSE_TRANSFORMS)}"
        )
    if feature.transform and kind not in ("dense", "count"):
        raise SpecError(f"{where}: transforms apply to dense and count features only")
    if kind == "count" and "standardise" in feature.transform:
        raise SpecError(
            f"{where}: a count feature takes clip and log1p; standardise needs statistics that "
            "are fitted before the counts exist"
        )
    if "clip" in feature.transform and feature.clip is None:
        raise SpecError(f"{where}: the clip transform needs `clip: [low, high]`")
    if feature.ids != "vocabulary" and feature.min_count != 1:
        raise SpecError(f"{where}: min_count applies to vocabularies, not to `ids: {feature.ids}`")
    if feature.ids == "vocabulary" and feature.cardinality is not None:
        raise SpecError(
            f"{where}: a vocabulary's size is what it holds; `cardinality` applies to "
            "`ids: hash` and `ids: index`"
        )
    if feature.ids == "index" and (feature.type != "int" or feature.cardinality is None):
        raise SpecError(
            f"{where}: `ids: index` takes integer ids (type: int) and a declared `cardinality` "
            "(ids are 0..cardinality-1)"
        )
    if kind in ("sequence", "count") and feature.of is None:
        raise SpecError(f"{where}: a {kind} feature needs `of: <categorical feature>`")
    if feature.cardinality is not None and feature.cardinality < 1:
        raise SpecError(f"{where}: cardinality must be >= 1")
    return feature


def _clip(value: Any, where: str) -> tuple[float, float] | None:
    if value is None:
        return None
    if (
        not isinstance(value, list | tuple)
        or len(value) != 2
        or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
        or value[0] > value[1]
    ):
        raise SpecError(f"{where}: clip is [low, high] with low <= high, got {value!r}")
    return float(value[0]), float(value[1])


def _optional_int(value: float | None) -> int | None:
    return None if value is None else int(value)


class _Mapping:
    """A mapping read key by key: `done()` refuses the keys nobody asked for."""

    def __init__(self, raw: Any, where: str) -> None:
        if not isinstance(raw, dict):
            raise SpecError(
                f"{where}: a mapping (key: value) is required, got {type(raw).__name__}"
            )
        self.raw = raw
        self.where = where
        self.seen: set[str] = set()

    _MISSING = object()

    def _get(self, key: str, default: Any) -> Any:
        self.seen.add(key)
        if key in self.raw:
            return self.raw[key]
        if default is self._MISSING:
            raise SpecError(f"{self.where}: `{key}` is required")
        return default

    def text(self, key: str, default: Any = _MISSING) -> Any:
        value = self._get(key, default)
        if value is not default and not isinstance(value, str):
            raise SpecError(f"{self.where}.{key}: a string is required, got {value!r}")
        return value

    def number(self, key: str, default: Any = _MISSING) -> Any:
        value = self._get(key, default)
        if value is not default and (not isinstance(value, int | float) or isinstance(value, bool)):
            raise SpecError(f"{self.where}.{key}: a number is required, got {value!r}")
        return value

    def boolean(self, key: str, default: Any = _MISSING) -> Any:
        value = self._get(key, default)
        if value is not default and not isinstance(value, bool):
            raise SpecError(f"{self.where}.{key}: true or false is required, got {value!r}")
        return value

    def choice(self, key: str, accepted: tuple[str, ...], default: Any = _MISSING) -> Any:
        value = self._get(key, default)
        if value is not default and value not in accepted:
            raise SpecError(
                f"{self.where}.{key}: {value!r} is not accepted; accepted: {', '.join(accepted)}"
            )
        return value

    def strings(self, key: str, default: Any = _MISSING) -> list[str]:
        value = self._get(key, default)
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise SpecError(f"{self.where}.{key}: a list of strings is required, got {value!r}")
        return list(value)

    def list(self, key: str, default: Any = _MISSING) -> list:
        value = self._get(key, default)
        if not isinstance(value, list | tuple):
            raise SpecError(f"{self.where}.{key}: a list is required, got {value!r}")
        return list(value)

    def mapping(self, key: str, default: Any = _MISSING) -> _Mapping:
        return _Mapping(self._get(key, default), f"{self.where}.{key}")

    def done(self) -> None:
        unknown = sorted(set(self.raw) - self.seen)
        if unknown:
            raise SpecError(
                f"{self.where}: unknown key(s) {unknown}; accepted: {', '.join(sorted(self.seen))}"
            )
