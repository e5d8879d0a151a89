from __future__ import annotations

import pytest

from models.config import TrainConfig, run_config_from_dict, train_config_of_run
from models.errors import ModelConfigError

# A run as a checkpoint manifest written before methods had their own options records it: its
# explicit table holds every option of every method.
OLD_RUN = {
    "dataset": "movielens-1m",
    "model": {"name": "dcn"},
    "tables": {
        "tables": [
            {
                "name": "item_id",
                "num_embeddings": 3706,
                "dim": 16,
                "method": "qr",
                "budget": 0.1,
                "combine": "add",
                "capacity": None,
                "eviction": "lru",
            }
        ],
        "feature_to_table": {"item_id": "item_id"},
    },
    "train": {"batch_size": 512, "sparse_lr": 0.05, "seed": 3},
}


def test_a_continued_run_reads_its_train_options_from_an_old_format_manifest() -> None:
    with pytest.raises(ModelConfigError, match="do not apply"):
        run_config_from_dict(OLD_RUN)
    train = train_config_of_run(OLD_RUN)
    assert (train.batch_size, train.sparse_lr, train.seed) == (512, 0.05, 3)
    assert train_config_of_run({"dataset": "movielens-1m"}) == TrainConfig()


def test_a_run_whose_train_options_are_wrong_is_refused_by_name() -> None:
    with pytest.raises(ModelConfigError, match="manifest.run.train.*batch_sizes"):
        train_config_of_run({"train": {"batch_sizes": 3}})
