"""Data wheels: fetched with pip into the cache, checked by sha256, fetched again once."""

from __future__ import annotations

import dataclasses

import pytest

from feature_store.wheels import OBP, DataError, cache_dir, fetch_wheel, open_member, sha256_of


def test_corrupt_cached_wheel_is_fetched_again(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBTAB_DATA", str(tmp_path))
    path = fetch_wheel(OBP)
    assert path.parent == cache_dir() / "wheels"
    path.write_bytes(b"not a wheel")
    again = fetch_wheel(OBP)
    assert sha256_of(again) == OBP.sha256
    assert open_member(OBP, "obp/dataset/obd/random/all/all.csv").startswith(b",timestamp")


def test_wheel_whose_sha_never_matches_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBTAB_DATA", str(tmp_path))
    wrong = dataclasses.replace(OBP, sha256="0" * 64)
    with pytest.raises(DataError, match="expected 0000.*even after downloading it again"):
        fetch_wheel(wrong)
    assert not (tmp_path / "wheels" / OBP.filename).exists()


def test_missing_member_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBTAB_DATA", str(tmp_path))
    with pytest.raises(DataError, match="no member 'nope.csv'"):
        open_member(OBP, "nope.csv")
