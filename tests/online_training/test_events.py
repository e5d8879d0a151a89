"""Per-event JSON decoded through the data set's preprocessing artifact: good events become
feature-log rows of model input, every kind of bad one an error with its reason."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from online_training import events
from tests.online_training.raw_events import click, encoded, impression

NOW = 1_700_001_000.0


@pytest.fixture
def decoder(raw_dataset) -> events.EventDecoder:
    return events.EventDecoder(raw_dataset.preprocessor(), max_future_s=60, wall_clock=lambda: NOW)


def test_impressions_are_encoded_by_the_artifact(raw_dataset, decoder):
    preprocessor = raw_dataset.preprocessor()
    sent = [impression("r-a", NOW - 5, "u7", "sku-3"), impression("r-b", NOW - 4, "new-user")]
    sent[1]["item"] = "never-seen-sku"
    decoded, errors = decoder.impressions([encoded(e) for e in sent], [NOW, NOW])
    assert errors == {}
    rows = decoded.rows
    assert rows.column("event_time").to_pylist() == [NOW - 5, NOW - 4]
    for name, raw in [
        ("user", pa.array(["u7", "new-user"])),
        ("item", pa.array(["sku-3", "never-seen-sku"])),
        ("campaign", pa.array(["c3", "c3"])),
        ("tags", pa.array([["a", "c"], ["a", "c"]])),
        ("price", pa.array([19.5, 19.5])),
    ]:
        assert rows.column(name).equals(preprocessor.encode(name, raw)), name
    oov = preprocessor.vocabularies["item"].size - 1
    assert rows.column("item").to_pylist()[1] == oov  # unseen -> the out-of-vocabulary id
    ids = rows.column("request_id").to_numpy()
    assert len(set(ids.tolist())) == 2 and (ids >= 0).all()
    assert ids.tolist() == events.request_keys(["r-a", "r-b"]).tolist()


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda e: b"{not json", "malformed-json"),
        (lambda e: b"\xff\xfe", "malformed-json"),
        (lambda e: b"[1, 2]", "not-an-object"),
        (lambda e: {k: v for k, v in e.items() if k != "price"}, "missing-field"),
        (lambda e: {k: v for k, v in e.items() if k != "req"}, "missing-field"),
        (lambda e: {**e, "user": 42}, "wrong-type"),
        (lambda e: {**e, "price": "cheap"}, "wrong-type"),
        (lambda e: {**e, "tags": 5}, "wrong-type"),
        (lambda e: {**e, "req": True}, "wrong-type"),
        (lambda e: {**e, "ts": "yesterday"}, "bad-time"),
        (lambda e: {**e, "ts": int((NOW + 3600) * 1000)}, "future-time"),
        (lambda e: {**e, "campaign": "c-unknown"}, "unmappable"),
    ],
)
def test_a_bad_event_is_reported_and_the_others_go_through(decoder, change, reason):
    good = [impression(f"r{i}", NOW - 10 + i) for i in range(3)]
    bad = change(impression("bad", NOW - 9))
    values = [encoded(good[0]), bad if isinstance(bad, bytes) else encoded(bad)]
    values += [encoded(e) for e in good[1:]]
    decoded, errors = decoder.impressions(values, [NOW] * 4)
    assert list(errors) == [1] and errors[1].reason == reason, errors
    assert decoded.message_index.tolist() == [0, 2, 3]
    assert decoded.rows.num_rows == 3


def test_actions_take_the_label_rule_or_are_clicks(raw_dataset, decoder):
    sent = [click("r1", NOW - 3), {**click("r2", NOW - 2), "clicked": 0}, b"{}"]
    decoded, errors = decoder.actions([v if isinstance(v, bytes) else encoded(v) for v in sent])
    assert decoded.click.tolist() == [1, 0]
    assert decoded.event_time.tolist() == [NOW - 3, NOW - 2]
    assert np.isnan(decoded.impression_time).all()
    assert errors[2].reason == "missing-field"


def test_auto_tells_json_from_arrow():
    assert events.is_json(b'  {"a": 1}') and not events.is_json(b"\xff\xff\xff\xff")
    assert not events.is_json(b"") and not events.is_json(None)
    assert json.loads(encoded(click("r", 1.0)))["ts"] == 1000


def test_decode_gives_raw_values_that_encode_back(movielens):
    """What a JSON replay sends: the prepared rows (a slice, as batches come) decoded to raw
    values by the artifact, which encodes them back to the same rows."""
    preprocessor = movielens.preprocessor()
    rows = movielens.read("test").slice(37, 300).combine_chunks()
    for feature in preprocessor.spec.features:
        prepared = rows.column(feature.name).chunk(0)
        back = preprocessor.encode(feature.name, preprocessor.decode(feature.name, prepared))
        if feature.kind in ("dense", "count"):
            np.testing.assert_allclose(back, prepared, rtol=1e-6, atol=1e-6)
        else:
            assert back.to_pylist() == prepared.to_pylist(), feature.name


def test_a_run_parsed_at_once_keeps_each_events_meaning(raw_dataset, decoder):
    """One run holds what the column-wise parse cannot vouch for (a null, a missing field, a
    pretty-printed object, an empty message, a time too far ahead, an unmappable value) between
    good events: each bad one gets its reason, and every good one is encoded as on its own."""
    preprocessor = raw_dataset.preprocessor()
    sent: list = [impression(f"r{i}", NOW - 20 + i, f"u{i}", f"sku-{i}") for i in range(10)]
    sent[1]["item"] = None  # a missing value, as offline: the out-of-vocabulary id
    sent[2] = json.dumps(sent[2], indent=2).encode()  # line breaks inside the message
    del sent[3]["price"]
    sent[4]["price"] = None
    sent[5]["ts"] = int((NOW + 3600) * 1000)
    sent[6] = b""
    sent[7]["campaign"] = "c-unknown"
    sent[8]["tags"] = "b||e"
    values = [v if isinstance(v, bytes) else encoded(v) for v in sent]
    decoded, errors = decoder.impressions(values, [NOW - i for i in range(10)])
    assert {i: e.reason for i, e in errors.items()} == {
        3: "missing-field",
        5: "future-time",
        6: "malformed-json",
        7: "unmappable",
    }
    good = [0, 1, 2, 4, 8, 9]
    assert decoded.message_index.tolist() == good
    raw = [json.loads(values[i]) for i in good]
    rows = decoded.rows
    assert (
        rows.column("request_id").to_pylist()
        == events.request_keys([e["req"] for e in raw]).tolist()
    )
    assert rows.column("event_time").to_pylist() == [e["ts"] / 1000 for e in raw]
    assert rows.column("produced_at").to_pylist() == [NOW - i for i in good]
    for name, column in [
        ("user", pa.array([e["user"] for e in raw], pa.string())),
        ("item", pa.array([e["item"] for e in raw], pa.string())),
        ("campaign", pa.array([e["campaign"] for e in raw])),
        ("tags", pa.array([[t for t in e["tags"].split("|") if t] for e in raw])),
        ("price", pa.array([e["price"] for e in raw], pa.float64())),
    ]:
        assert rows.column(name).equals(preprocessor.encode(name, column)), name


def test_a_run_the_parse_refuses_is_decoded_event_by_event(raw_dataset, decoder):
    """Ids of two types in one run (a string and an integer request id, tags as text and as a
    list) make the column-wise parse refuse it: every event is still decoded."""
    sent = [impression("r-a", NOW - 5), impression(7, NOW - 4), impression("r-b", NOW - 3)]
    sent[2]["tags"] = ["a", "c"]
    decoded, errors = decoder.impressions([encoded(e) for e in sent], [NOW] * 3)
    assert errors == {}
    assert (
        decoded.rows.column("request_id").to_pylist()
        == events.request_keys(["r-a", 7, "r-b"]).tolist()
    )
    tags = decoded.rows.column("tags")
    assert tags.equals(raw_dataset.preprocessor().encode("tags", pa.array([["a", "c"]] * 3)))


def test_a_run_of_actions_keeps_each_labels_meaning(decoder):
    sent = [
        click("r1", NOW - 5),
        {**click("r2", NOW - 4), "clicked": 0},
        {**click("r3", NOW - 3), "clicked": None},
        {**click("r4", NOW - 2), "clicked": 2},
        {**click("r5", NOW - 1), "clicked": 1},
        {"ts": int(NOW * 1000)},
    ]
    decoded, errors = decoder.actions([encoded(e) for e in sent])
    assert {i: e.reason for i, e in errors.items()} == {
        2: "wrong-type",
        3: "wrong-type",
        5: "missing-field",
    }
    assert decoded.message_index.tolist() == [0, 1, 4]
    assert decoded.click.tolist() == [1, 0, 1]
    assert decoded.event_time.tolist() == [NOW - 5, NOW - 4, NOW - 1]
    assert decoded.request_id.tolist() == events.request_keys(["r1", "r2", "r5"]).tolist()
