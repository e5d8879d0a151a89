"""Ranking and retrieval models built from a schema and TableConfigs, and their batch trainer.

The pieces other packages use: `batch_from_columns` (columns -> KJT + dense + labels, for
serving and streaming), `train_step` and `dense_optimizer` (one update, shared with the
streaming trainer), `save_checkpoint` / `load_checkpoint`, and `train` for a whole run.
"""

from models.base import Model
from models.batches import Batch, BatchLoader, batch_from_columns
from models.build import ModelSpec, build_model, plan_model
from models.checkpoint import Checkpoint, load_checkpoint, read_manifest, save_checkpoint
from models.config import (
    DCNConfig,
    DeepFMConfig,
    DINConfig,
    DLRMConfig,
    LRConfig,
    MFConfig,
    RunConfig,
    TablesConfig,
    TrainConfig,
    TwoTowerConfig,
    run_config_from_dict,
)
from models.errors import (
    BatchError,
    CheckpointError,
    MetricError,
    ModelConfigError,
    ModelError,
    NonFiniteLossError,
)
from models.train import dense_optimizer, evaluate, fit, predict, train, train_step

__all__ = [
    "Batch",
    "BatchError",
    "BatchLoader",
    "Checkpoint",
    "CheckpointError",
    "DCNConfig",
    "DINConfig",
    "DLRMConfig",
    "DeepFMConfig",
    "LRConfig",
    "MFConfig",
    "MetricError",
    "Model",
    "ModelConfigError",
    "ModelError",
    "ModelSpec",
    "NonFiniteLossError",
    "RunConfig",
    "TablesConfig",
    "TrainConfig",
    "TwoTowerConfig",
    "batch_from_columns",
    "build_model",
    "dense_optimizer",
    "evaluate",
    "fit",
    "load_checkpoint",
    "plan_model",
    "predict",
    "read_manifest",
    "run_config_from_dict",
    "save_checkpoint",
    "train",
    "train_step",
]
