"""A synthetic Criteo-like data set: 26 Zipf categorical features, 13 dense, labels from a teacher.

The teacher is a hidden factorisation machine whose per-id weights are a hash of (feature, id),
so it needs no memory even at 1e8 ids per feature, and the label depends on each id's own
weights: a compressed table that merges popular ids loses measurable AUC. Rows are generated
in chunks, each from its own seeded generator, so any slice is reproducible on its own.

Criteo's features are anonymous; streaming and serving need a user key and an item key (the
stream partitions and joins by them, a scoring request names one user and many items), so the
two features with the most ids play those roles: with the Kaggle cardinalities `cat_2` (10.1M
ids) is the user and `cat_11` (8.4M) the item. Ids are independent across features, so the
user-item graph has no community structure for GraphHash to find.

`embtab data prepare synthetic-criteo` writes the generator's rows once as raw Parquet and
prepares them with the bundled spec (`feature_store/specs/synthetic-criteo.yaml`), like any
user's data.
"""

from __future__ import annotations

import hashlib
import math
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from feature_store.schema import FeatureSpec, Schema
from feature_store.spec import DatasetSpec, load_spec
from feature_store.wheels import cache_dir

# Criteo Kaggle (Display Advertising Challenge) cardinalities, as reported by the DLRM scripts.
CRITEO_KAGGLE_CARDINALITIES = (
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
)  # fmt: skip
NUM_DENSE = 13
MAX_CARDINALITY = 10**8
SPEC_PATH = Path(__file__).parent / "specs" / "synthetic-criteo.yaml"
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


class SyntheticConfigError(ValueError):
    """A synthetic data set configuration outside what the generator accepts."""


@dataclass(frozen=True)
class SyntheticCriteoConfig:
    rows: int = 1_000_000
    cardinalities: tuple[int, ...] = CRITEO_KAGGLE_CARDINALITIES
    zipf_exponent: float = 1.05
    teacher_dim: int = 4
    target_ctr: float = 0.25
    chunk_rows: int = 131_072
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rows < 10:
            raise SyntheticConfigError(f"rows must be >= 10, got {self.rows}")
        bad = [c for c in self.cardinalities if not 1 <= c <= MAX_CARDINALITY]
        if bad:
            raise SyntheticConfigError(
                f"cardinalities must be in [1, {MAX_CARDINALITY:.0e}], got {bad}"
            )
        if self.zipf_exponent <= 1.0:
            raise SyntheticConfigError(f"zipf_exponent must be > 1, got {self.zipf_exponent}")


def _splitmix64(values: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = values.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return (z ^ (z >> np.uint64(31))) & _MASK64


def _zipf_ranks(rng: np.random.Generator, size: int, n: int, exponent: float) -> np.ndarray:
    """Ranks 0..n-1 from a bounded power law (inverse CDF of its continuous approximation)."""
    uniform = rng.random(size)
    top = (n + 1.0) ** (1.0 - exponent)
    ranks = ((top - 1.0) * uniform + 1.0) ** (1.0 / (1.0 - exponent)) - 1.0
    return np.minimum(ranks.astype(np.int64), n - 1)


def _permutation_multiplier(n: int, feature: int) -> int:
    """A multiplier coprime with n, so rank -> (a * rank + b) mod n is a permutation."""
    candidate = 0x9E3779B1 + 2 * feature
    while math.gcd(candidate, n) != 1:
        candidate += 1
    return candidate


class SyntheticCriteo:
    """The generator: `chunk(index)` gives one reproducible chunk of rows."""

    def __init__(self, config: SyntheticCriteoConfig) -> None:
        self.config = config
        rng = np.random.default_rng([config.seed, 2**31 - 1])
        features = len(config.cardinalities)
        self._dense_weights = rng.normal(0.0, 0.3, NUM_DENSE)
        self._feature_weights = rng.normal(0.0, 1.0, (features, config.teacher_dim))
        self._dense_mu = rng.uniform(0.0, 3.0, NUM_DENSE)
        self._dense_sigma = rng.uniform(0.5, 1.5, NUM_DENSE)
        self._offsets = rng.integers(0, 2**31, features)
        self._bias = self._calibrate_bias()

    @property
    def num_chunks(self) -> int:
        return -(-self.config.rows // self.config.chunk_rows)

    def schema(self) -> Schema:
        categorical = tuple(
            FeatureSpec(f"cat_{index}", "categorical", cardinality)
            for index, cardinality in enumerate(self.config.cardinalities)
        )
        dense = tuple(FeatureSpec(f"dense_{index}", "dense") for index in range(NUM_DENSE))
        return Schema(
            dataset="synthetic-criteo", features=categorical + dense, id_columns=self.roles()
        )

    def roles(self) -> dict[str, str]:
        """The user and item keys: the features with the most ids (the first on ties)."""
        if len(self.config.cardinalities) < 2:
            return {}
        by_size = sorted(
            range(len(self.config.cardinalities)), key=lambda f: -self.config.cardinalities[f]
        )
        return {"user": f"cat_{by_size[0]}", "item": f"cat_{by_size[1]}"}

    def _teacher_vectors(self, feature: int, ids: np.ndarray) -> np.ndarray:
        dim = self.config.teacher_dim
        keys = ids.astype(np.uint64) * np.uint64(dim * 64 + 1) + np.uint64(feature * 1_000_003)
        keys = keys[:, None] + np.arange(dim, dtype=np.uint64)[None, :]
        bits = _splitmix64(keys ^ np.uint64(self.config.seed))
        return (bits >> np.uint64(11)).astype(np.float64) / float(1 << 53) * 2.0 - 1.0

    def _logits(self, ids: list[np.ndarray], dense: np.ndarray) -> np.ndarray:
        vectors = [self._teacher_vectors(f, feature_ids) for f, feature_ids in enumerate(ids)]
        linear = sum((v * self._feature_weights[f]).sum(axis=1) for f, v in enumerate(vectors))
        summed = sum(vectors)
        squares = sum(v * v for v in vectors)
        pairwise = 0.5 * (summed * summed - squares).sum(axis=1)
        standardised = (dense - self._dense_mu) / self._dense_sigma
        return linear * 0.5 + pairwise * 0.3 + standardised @ self._dense_weights

    def _calibrate_bias(self) -> float:
        """Bias that puts the teacher's mean click probability at `target_ctr`."""
        ids, dense = self._features(np.random.default_rng([self.config.seed, 2**31 - 2]), 20_000)
        logits = self._logits(ids, dense)
        low, high = -20.0, 20.0
        for _ in range(60):
            middle = (low + high) / 2
            ctr = np.mean(1.0 / (1.0 + np.exp(-(logits + middle))))
            low, high = (middle, high) if ctr < self.config.target_ctr else (low, middle)
        return (low + high) / 2

    def _features(self, rng: np.random.Generator, size: int) -> tuple[list[np.ndarray], np.ndarray]:
        ids = []
        for feature, cardinality in enumerate(self.config.cardinalities):
            ranks = _zipf_ranks(rng, size, cardinality, self.config.zipf_exponent)
            multiplier = _permutation_multiplier(cardinality, feature)
            ids.append((ranks * multiplier + int(self._offsets[feature])) % cardinality)
        dense = np.log1p(
            np.floor(np.exp(rng.normal(self._dense_mu, self._dense_sigma, (size, NUM_DENSE))))
        )
        return ids, dense

    def chunk(self, index: int) -> pa.RecordBatch:
        start = index * self.config.chunk_rows
        size = min(self.config.chunk_rows, self.config.rows - start)
        rng = np.random.default_rng([self.config.seed, index])
        ids, dense = self._features(rng, size)
        probability = 1.0 / (1.0 + np.exp(-(self._logits(ids, dense) + self._bias)))
        labels = (rng.random(size) < probability).astype(np.int8)
        columns = {f"cat_{f}": pa.array(feature_ids) for f, feature_ids in enumerate(ids)}
        columns.update(
            {f"dense_{d}": pa.array(dense[:, d].astype(np.float32)) for d in range(NUM_DENSE)}
        )
        columns["label"] = pa.array(labels)
        columns["timestamp"] = pa.array(np.arange(start, start + size, dtype=np.int64))
        return pa.RecordBatch.from_pydict(columns)

    def batches(self) -> Iterator[pa.RecordBatch]:
        for index in range(self.num_chunks):
            yield self.chunk(index)


def raw_dir(config: SyntheticCriteoConfig) -> Path:
    """A directory holding the generator's rows as raw Parquet (`events.parquet`), written once
    per configuration chunk by chunk (memory stays at one chunk whatever the row count)."""
    key = hashlib.sha256(repr(config).encode()).hexdigest()[:12]
    directory = cache_dir() / "raw" / "synthetic-criteo" / key
    if (directory / "events.parquet").exists():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    generator = SyntheticCriteo(config)
    with tempfile.NamedTemporaryFile(dir=directory, suffix=".parquet", delete=False) as handle:
        writer = None
        for batch in generator.batches():
            if writer is None:
                writer = pq.ParquetWriter(handle.name, batch.schema)
            writer.write_batch(batch, row_group_size=config.chunk_rows)
        writer.close()
    Path(handle.name).rename(directory / "events.parquet")
    return directory


def spec(config: SyntheticCriteoConfig) -> DatasetSpec:
    """The bundled spec over the rows of `config`, with its features, cardinalities and roles."""
    bundled = load_spec(SPEC_PATH)
    template = bundled.feature("cat_0")
    categorical = tuple(
        replace(template, name=f"cat_{index}", column=f"cat_{index}", cardinality=cardinality)
        for index, cardinality in enumerate(config.cardinalities)
    )
    dense = tuple(feature for feature in bundled.features if feature.kind == "dense")
    return replace(
        bundled,
        features=categorical + dense,
        roles=SyntheticCriteo(config).roles(),
        base_dir=str(raw_dir(config)),
    )
