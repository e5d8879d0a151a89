"""The data-set spec: YAML and TOML alike, every key checked, errors say what is accepted."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

from feature_store.spec import DatasetSpec, SpecError, load_spec, parse_spec

YAML_SPEC = """
name: clicks
source: {format: csv, paths: ["logs/*.csv"], delimiter: ";", quote_char: "'"}
label: {column: rating, op: ">=", value: 4}
time: {column: ts, unit: ms}
roles: {user: user_id, item: item_id, request: request_id}
features:
  - {name: user_id, kind: categorical, ids: hash}
  - {name: item_id, kind: categorical, type: int, min_count: 2}
  - {name: tags, kind: multi_valued, separator: "|", max_length: 8}
  - {name: price, kind: dense, transform: [clip, log1p, standardise], clip: [0, 100]}
  - {name: hist_item_id, kind: sequence, of: item_id, max_length: 20}
  - {name: user_activity, kind: count, of: user_id, transform: [log1p]}
split: {by: random, valid: 0.2, test: 0.1, seed: 3}
fit_on: all
"""

TOML_SPEC = """
name = "clicks"
fit_on = "all"

[source]
format = "csv"
paths = ["logs/*.csv"]
delimiter = ";"
quote_char = "'"

[label]
column = "rating"
op = ">="
value = 4

[time]
column = "ts"
unit = "ms"

[roles]
user = "user_id"
item = "item_id"
request = "request_id"

[split]
by = "random"
valid = 0.2
test = 0.1
seed = 3

[[features]]
name = "user_id"
kind = "categorical"
ids = "hash"

[[features]]
name = "item_id"
kind = "categorical"
type = "int"
min_count = 2

[[features]]
name = "tags"
kind = "multi_valued"
separator = "|"
max_length = 8

[[features]]
name = "price"
kind = "dense"
transform = ["clip", "log1p", "standardise"]
clip = [0, 100]

[[features]]
name = "hist_item_id"
kind = "sequence"
of = "item_id"
max_length = 20

[[features]]
name = "user_activity"
kind = "count"
of = "user_id"
transform = ["log1p"]
"""


def _base() -> dict:
    return {
        "name": "clicks",
        "source": {"format": "csv", "paths": ["events.csv"]},
        "label": {"column": "clicked"},
        "time": {"column": "ts"},
        "roles": {"user": "user_id", "item": "item_id"},
        "features": [
            {"name": "user_id", "kind": "categorical"},
            {"name": "item_id", "kind": "categorical"},
        ],
    }


def _with(change) -> dict:
    raw = copy.deepcopy(_base())
    change(raw)
    return raw


def test_yaml_and_toml_describe_the_same_spec(tmp_path):
    (tmp_path / "a.yaml").write_text(YAML_SPEC)
    (tmp_path / "a.toml").write_text(TOML_SPEC)
    from_yaml = load_spec(tmp_path / "a.yaml")
    from_toml = load_spec(tmp_path / "a.toml")
    assert from_yaml == from_toml
    assert from_yaml.base_dir == str(tmp_path.resolve())
    assert from_yaml.source.field_delimiter == ";" and from_yaml.source.quote_char == "'"
    assert from_yaml.feature("user_id").hashed
    assert from_yaml.feature("item_id").type == "int"
    assert from_yaml.feature("item_id").min_count == 2
    assert from_yaml.feature("price").clip == (0.0, 100.0)
    assert from_yaml.feature("tags").max_length == 8
    assert from_yaml.roles == {"user": "user_id", "item": "item_id", "request": "request_id"}
    assert (from_yaml.split.by, from_yaml.split.valid, from_yaml.split.seed) == ("random", 0.2, 3)


def test_defaults_are_documented_ones():
    spec = parse_spec(_base(), base_dir="/data")
    assert spec.source.field_delimiter == "," and spec.source.header
    assert spec.time.unit == "s"
    assert (spec.split.by, spec.split.valid, spec.split.test) == ("time", 0.1, 0.1)
    assert spec.fit_on == "train"
    user = spec.feature("user_id")
    assert (user.ids, user.type, user.min_count, user.oov, user.column) == (
        "vocabulary",
        "string",
        1,
        True,
        "user_id",
    )
    tsv = parse_spec(_with(lambda r: r["source"].update(format="tsv")), base_dir="/data")
    assert tsv.source.field_delimiter == "\t"


def test_the_spec_round_trips_through_its_canonical_json(tmp_path):
    (tmp_path / "a.yaml").write_text(YAML_SPEC)
    spec = load_spec(tmp_path / "a.yaml")
    again = DatasetSpec.from_json(spec.to_json())
    assert again == spec
    assert again.to_json() == spec.to_json()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda r: r.update(colour="red"),
            r"spec: unknown key\(s\) \['colour'\]; accepted: .*name",
        ),
        (
            lambda r: r["source"].update(sep=","),
            r"spec.source: unknown key\(s\) \['sep'\]; accepted: .*delimiter",
        ),
        (
            lambda r: r["features"][0].update(vocab_size=3),
            r"feature 'user_id': unknown key\(s\) \['vocab_size'\]; accepted: .*min_count",
        ),
        (
            lambda r: r["features"].append({"name": "user_id", "kind": "dense"}),
            r"two features are named \['user_id'\]; names must be unique",
        ),
        (lambda r: r.pop("label"), r"spec: `label` is required"),
        (
            lambda r: r["source"].update(format="json"),
            r"spec.source.format: 'json' is not accepted; accepted: csv, tsv, parquet",
        ),
        (
            lambda r: r["time"].update(unit="minutes"),
            r"spec.time.unit: 'minutes' is not accepted; accepted: s, ms, us, ns, iso8601",
        ),
        (
            lambda r: r["features"][1].update(kind="embedding"),
            r"feature 'item_id'.kind: 'embedding' is not accepted; accepted: categorical",
        ),
        (
            lambda r: r["features"][1].update(ids="dense"),
            r"feature 'item_id'.ids: 'dense' is not accepted; accepted: vocabulary, hash, index",
        ),
        (lambda r: r["label"].update(op=">="), r"label: `op` and `value` go together"),
        (lambda r: r.update(split={"valid": 0.6, "test": 0.5}), r"valid \+ test < 1"),
        (lambda r: r.update(split={"test": 0}), r"0 < test"),
        (lambda r: r.update(split={"valid": 0}), r"0 < valid, 0 < test .*every split needs rows"),
        (
            lambda r: r["features"].append(
                {"name": "n", "kind": "count", "of": "user_id", "transform": ["standardise"]}
            ),
            r"feature 'n': a count feature takes clip and log1p",
        ),
        (
            lambda r: r["source"].update(paths=[]),
            r"source.paths: a file, a glob or a list of them",
        ),
        (
            lambda r: r["source"].update(header=False),
            r"source: a file without a header needs `column_names`",
        ),
        (lambda r: r["source"].update(delimiter=";;"), r"source.delimiter: one character"),
        (lambda r: r["source"].update(quote_char="''"), r"source.quote_char: one character"),
        (
            lambda r: r["features"].extend(
                [
                    {"name": "p", "kind": "dense"},
                    {"name": "hist", "kind": "sequence", "of": "p", "max_length": 2},
                ]
            ),
            r"feature 'hist': `of` must name a categorical feature of this spec, got 'p'",
        ),
        (
            lambda r: r["features"].append({"name": "hist", "kind": "sequence", "of": "item_id"}),
            r"feature 'hist': a sequence feature needs max_length >= 1",
        ),
        (
            lambda r: (
                r.pop("roles"),
                r["features"].append(
                    {"name": "hist", "kind": "sequence", "of": "item_id", "max_length": 5}
                ),
            ),
            r"feature 'hist': a sequence is per user; set roles.user",
        ),
        (
            lambda r: r["features"].append({"name": "label", "kind": "dense"}),
            r"'label' and 'timestamp' are reserved",
        ),
        (
            lambda r: r["features"].append({"name": "p", "kind": "dense", "transform": ["sqrt"]}),
            r"feature 'p': unknown transform\(s\) \['sqrt'\]; accepted: log1p, standardise, clip",
        ),
        (
            lambda r: r["features"].append({"name": "p", "kind": "dense", "transform": ["clip"]}),
            r"feature 'p': the clip transform needs `clip: \[low, high\]`",
        ),
        (
            lambda r: r["features"].append({"name": "p", "kind": "dense", "clip": [3, 1]}),
            r"feature 'p': clip is \[low, high\] with low <= high",
        ),
        (
            lambda r: r["features"][0].update(transform=["log1p"]),
            r"feature 'user_id': transforms apply to dense and count features only",
        ),
        (
            lambda r: r["features"][0].update(ids="hash", min_count=3),
            r"min_count applies to vocabularies, not to `ids: hash`",
        ),
        (lambda r: r["features"][0].update(min_count=0), r"min_count must be >= 1"),
        (
            lambda r: r["features"][1].update(ids="index", type="int"),
            r"feature 'item_id': `ids: index` takes integer ids \(type: int\) and a declared "
            r"`cardinality`",
        ),
        (
            lambda r: r["features"][1].update(ids="index", cardinality=10),
            r"`ids: index` takes integer ids",
        ),
        (
            lambda r: r["features"][1].update(cardinality=10),
            r"feature 'item_id': a vocabulary's size is what it holds; `cardinality` applies to",
        ),
        (
            lambda r: r["roles"].update(user="nobody"),
            r"roles.user: 'nobody' is not a feature of this spec",
        ),
        (
            lambda r: r["roles"].update(buyer="user_id"),
            r"spec.roles: unknown key\(s\) \['buyer'\]; accepted: item, request, user",
        ),
        (lambda r: r["features"][0].update(oov="yes"), r"oov: true or false is required"),
        (lambda r: r["features"][0].update(min_count="2"), r"min_count: a number is required"),
        (lambda r: r.update(features={"a": 1}), r"spec.features: a list is required"),
        (lambda r: r.update(label="clicked"), r"spec.label: a mapping \(key: value\) is required"),
    ],
)
def test_a_malformed_spec_names_the_key_and_what_is_accepted(change, message):
    raw = _with(change)
    with pytest.raises(SpecError, match=message):
        parse_spec(raw, base_dir=".")


def test_spec_files_that_cannot_be_read_or_parsed(tmp_path):
    with pytest.raises(SpecError, match=r"cannot read spec file .*missing.yaml"):
        load_spec(tmp_path / "missing.yaml")
    (tmp_path / "spec.json").write_text("{}")
    with pytest.raises(SpecError, match=r"unknown suffix '.json'; accepted: .yaml, .yml, .toml"):
        load_spec(tmp_path / "spec.json")
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match=r"bad.yaml does not parse"):
        load_spec(tmp_path / "bad.yaml")
    (tmp_path / "bad.toml").write_text("name = \n")
    with pytest.raises(SpecError, match=r"bad.toml does not parse"):
        load_spec(tmp_path / "bad.toml")


def test_a_join_takes_its_source_keys_inline(tmp_path):
    raw = _base()
    raw["features"].append({"name": "age", "kind": "categorical"})
    raw["joins"] = [
        {"format": "tsv", "path": "users.tsv", "key": "user_id", "columns": ["age"]},
    ]
    spec = parse_spec(raw, base_dir=str(tmp_path))
    assert spec.joins[0].source.paths == ("users.tsv",)
    assert spec.joins[0].source.field_delimiter == "\t"
    raw["joins"][0]["colour"] = "red"
    with pytest.raises(SpecError, match=r"joins\[0\]: unknown key\(s\) \['colour'\]"):
        parse_spec(raw, base_dir=str(tmp_path))


def test_bundled_specs_are_valid():
    for path in sorted((Path(__file__).parents[2] / "feature_store" / "specs").glob("*.yaml")):
        spec = load_spec(path)
        assert spec.name == path.stem


def test_the_annotated_spec_in_docs_your_data_is_a_valid_spec():
    """The walk-through's spec is what a new user copies: it must parse as it stands."""
    text = (Path(__file__).parents[2] / "docs" / "your-data.md").read_text()
    block = re.search(r"```yaml\n(.*?)```", text, re.S)
    assert block is not None, "docs/your-data.md lost its annotated spec"
    spec = parse_spec(yaml.safe_load(block.group(1)), base_dir="/data")
    assert spec.online is not None and spec.roles.keys() >= {"user", "item"}
