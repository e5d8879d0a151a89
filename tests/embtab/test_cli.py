"""The `embtab` command line: summaries, --json, and errors for bad input."""

from __future__ import annotations

import json

import numpy as np

from embtab.cli import is_user_error, main
from feature_store.schema import Schema, SchemaError
from serving.errors import RedisUnavailableError


def test_data_info_reports_movielens_1m_counts(capsys):
    assert main(["data", "info", "movielens-1m"]) == 0
    line = capsys.readouterr().out.strip()
    assert "1,000,209 rows" in line and "users 6,040" in line and "items 3,706" in line


def test_data_info_json_lists_every_feature_with_its_cardinality(capsys):
    assert main(["data", "info", "movielens-1m", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["rows"] == 1_000_209
    assert result["features"]["item_id"]["cardinality"] == 3_706
    assert result["features"]["user_activity"]["kind"] == "dense"


def test_unknown_dataset_is_an_error_listing_valid_names(capsys):
    assert main(["data", "info", "imagenet"]) == 2
    error = capsys.readouterr().err
    assert "unknown data set 'imagenet'" in error and "movielens-1m" in error


def test_data_prepare_synthetic_prints_a_summary(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("EMBTAB_DATA", str(tmp_path))
    assert main(["data", "prepare", "synthetic-criteo", "--rows", "2000", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["rows"] == 2_000 and len(result["features"]) == 39


def test_services_up_prints_both_urls_and_stops(capsys):
    assert main(["services", "up", "--seconds", "0.1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["redis"].startswith("redis://127.0.0.1:")
    assert result["kafka"].startswith("127.0.0.1:")


def test_a_bad_input_error_is_one_line_without_a_traceback(capsys):
    assert main(["data", "info", "imagenet"]) == 2
    error = capsys.readouterr().err
    assert "Traceback" not in error and len(error.strip().splitlines()) == 1


def test_a_value_error_from_a_library_is_a_bug_and_keeps_its_traceback():
    """Only our typed errors are the user's to fix; numpy's ValueError inside a command is
    ours, and its traceback is what finds it."""
    try:
        np.reshape(np.arange(3), (2, 2))
    except ValueError as error:
        assert not is_user_error(error)
    assert not is_user_error(RedisUnavailableError("Redis at 127.0.0.1:1 did not answer"))
    try:
        Schema.from_json('{"dataset": "x", "features": [{"name": "a", "kind": "nonsense"}]}')
    except SchemaError as error:
        assert is_user_error(error)
