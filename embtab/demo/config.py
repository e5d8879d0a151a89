"""What one demo run does: the default (about 10 minutes on 2 cores) and the --quick slice."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from embtab.compression.grid import STUDY_TRAIN

DAY_S = 86_400.0


class DemoError(RuntimeError):
    """A demo input that cannot be run (unsupported data set, missing dependency)."""


@dataclass(frozen=True)
class CompressedTables:
    """One data set's compressed demo configuration (`TablesConfig` fields) and how the report
    describes it."""

    tables: dict[str, Any]
    summary: str


def movielens_tables() -> CompressedTables:
    """The compression study's winner at a quarter of the memory (docs/compression.md: qr
    `mult` at budget 0.25 is 0.0063 AUC below full tables on MovieLens-1M's DCN-v2; every
    other method at that budget loses 0.0149 or more). 0.24 rather than 0.25 keeps the whole
    model under a quarter, since the tables of fewer than 1,000 ids stay full."""
    return CompressedTables(
        tables={"method": "qr", "budget": 0.24, "options": {"combine": "mult"}},
        summary=(
            "every table of >= 1,000 ids (users, items, zip codes) as qr `mult` at 24% of its "
            "rows: each id's row is the product of a quotient and a remainder row"
        ),
    )


def criteo_tables() -> CompressedTables:
    return CompressedTables(
        tables={
            "method": "hash",
            "budget": 0.05,
            "compress_min_rows": 10_000,
            "overrides": {
                "cat_2": {
                    "method": "collisionless",
                    "budget": 0.02,
                    "min_count": 2,
                    "ttl_seconds": 3 * DAY_S,
                },
            },
        },
        summary=(
            "every table of >= 10,000 ids hashed to 5% of its rows, and the user-keyed one "
            "(cat_2, 10.1M ids) collisionless with room for 2% of its ids (admission at a second "
            "sighting, LRU eviction, 3-day expiry)"
        ),
    )


TABLES = {"movielens-1m": movielens_tables, "synthetic-criteo": criteo_tables}
SUPPORTED_DATASETS = tuple(TABLES)


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of every stage; `quick` names what the --quick run cuts."""

    dataset: str = "movielens-1m"
    quick: bool = False
    train_rows: int | None = None  # None: the whole train split
    epochs: int = 1
    eval_rows: int | None = 50_000
    replay_splits: tuple[str, ...] = ("valid", "test")
    replay_limit: int | None = None  # events per split; None: all
    replay_seconds: float = 120.0  # wall time the replay of one split is spread over
    sync_interval_s: float = 10.0
    window: int = 10_000
    online_store_rows: int | None = None
    load_concurrency: int = 1
    candidates: int = 100
    batch_size: int = 4096  # the stream's micro-batches
    # Offline training as the compression study trains its cells, so the demo's saving is the
    # one the study measured.
    offline_batch_size: int = STUDY_TRAIN.batch_size
    sparse_lr: float = STUDY_TRAIN.sparse_lr
    tables: CompressedTables = field(default_factory=movielens_tables)

    @classmethod
    def for_run(cls, dataset: str, quick: bool) -> DemoConfig:
        if dataset not in TABLES:
            raise DemoError(
                f"data set {dataset!r} is not supported by the demo; accepted: "
                f"{', '.join(SUPPORTED_DATASETS)}"
            )
        tables = TABLES[dataset]()
        if not quick:
            return cls(dataset=dataset, tables=tables)
        return cls(
            dataset=dataset,
            tables=tables,
            quick=True,
            train_rows=40_000,
            offline_batch_size=4096,
            eval_rows=10_000,
            replay_splits=("valid",),
            replay_limit=4_000,
            replay_seconds=15.0,
            sync_interval_s=3.0,
            window=1_000,
            online_store_rows=40_000,
            candidates=20,
        )

    def cuts(self) -> list[str]:
        """What this run leaves out of the full demo, for the report."""
        if not self.quick:
            return []
        return [
            f"offline training on the first {self.train_rows:,} train rows (1 epoch)",
            f"replay of the first {self.replay_limit:,} events of {'+'.join(self.replay_splits)}"
            " only",
            f"AUC windows of {self.window:,} examples, sync every {self.sync_interval_s:g} s",
            f"{self.candidates} candidates per scoring request",
        ]
