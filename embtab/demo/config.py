"""What one demo run does: the default (about 10 minutes on 2 cores) and the --quick slice."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SUPPORTED_DATASETS = ("movielens-1m",)


class DemoError(RuntimeError):
    """A demo input that cannot be run (unsupported data set, missing dependency)."""


def compressed_tables() -> dict[str, Any]:
    """qr for items (a tenth of the rows); for users a collisionless table with room for half
    of them, admission at a second sighting, 30-day expiry and LRU eviction."""
    return {
        "overrides": {
            "item_id": {"method": "qr", "budget": 0.1},
            "user_id": {
                "method": "collisionless",
                "budget": 0.5,
                "min_count": 2,
                "ttl_seconds": 30 * 86_400.0,
            },
        }
    }


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
    batch_size: int = 4096
    tables: dict[str, Any] = field(default_factory=compressed_tables)

    @classmethod
    def for_run(cls, dataset: str, quick: bool) -> DemoConfig:
        if dataset not in SUPPORTED_DATASETS:
            raise DemoError(
                f"data set {dataset!r} is not supported by the demo yet; accepted: "
                f"{', '.join(SUPPORTED_DATASETS)} (synthetic-criteo: not supported yet)"
            )
        if not quick:
            return cls(dataset=dataset)
        return cls(
            dataset=dataset,
            quick=True,
            train_rows=40_000,
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
