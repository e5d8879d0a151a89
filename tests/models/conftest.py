"""Fixtures of the model tests: the tiny generated data set."""

from __future__ import annotations

from pathlib import Path

import pytest

from feature_store.offline import Dataset
from tests.models.tiny_movielens import prepare_tiny


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("embtab-data")


@pytest.fixture
def tiny_dataset(tiny_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Dataset:
    monkeypatch.setenv("EMBTAB_DATA", str(tiny_cache))
    return prepare_tiny(tiny_cache)
