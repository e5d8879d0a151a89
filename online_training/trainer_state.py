"""The streaming trainer's state checkpoint: the model as of its last sync, and where it stands.

After every sync the trainer checkpoints its model with an `online` entry: the published model
it belongs to, the version and delta it reached, the newest event time, the examples trained and
the next offset per partition that sync covered. A restart resumes from it (`StartingPoint`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kafka import TopicPartition

from models.base import Model
from models.checkpoint import load_checkpoint, read_manifest
from online_training.sync import SyncPoint
from online_training.trainer_config import TrainerConfigError

STATE_KEY = "online"


@dataclass
class StartingPoint:
    """The model a trainer starts from, and what Redis may already hold of it.

    `origin_manifest`: the manifest of the checkpoint the model was loaded from (Redis may hold
    its unchanged publish). `resumed`: the sync the trainer's own state was saved at, and
    `offsets` the next offset per partition that sync covered: messages before them are in the
    state already, so a restart skips them even where their commit did not happen.
    """

    model: Model
    origin_manifest: dict[str, Any] | None = None
    resumed: SyncPoint | None = None
    event_time: float = -math.inf
    examples: int = 0
    offsets: dict[TopicPartition, int] = field(default_factory=dict)

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> StartingPoint:
        """An offline checkpoint (models' `save_checkpoint`)."""
        checkpoint = load_checkpoint(path)
        return cls(model=checkpoint.model, origin_manifest=checkpoint.manifest)

    @classmethod
    def resume(cls, state_path: str | Path, redis_model: str) -> StartingPoint | None:
        """The trainer's own state at `state_path`, or None if there is none yet.

        A state saved for another published model is an error: its version and deltas say
        nothing about this one.
        """
        path = Path(state_path)
        if not path.exists():
            return None
        online = state_entry(read_manifest(path), path, redis_model)
        return cls.from_state(load_checkpoint(path).model, online)

    @classmethod
    def from_state(cls, model: Model, online: dict[str, Any]) -> StartingPoint:
        """A model restored from a trainer's state, and that state's `online` entry."""
        event_time = online.get("event_time")
        return cls(
            model=model,
            origin_manifest=None,
            resumed=SyncPoint(
                int(online["version"]), int(online["delta"]), str(online.get("publish_id", ""))
            ),
            event_time=-math.inf if event_time is None else float(event_time),
            examples=int(online.get("examples", 0)),
            offsets={
                TopicPartition(topic, int(partition)): int(offset)
                for topic, partitions in online.get("offsets", {}).items()
                for partition, offset in partitions.items()
            },
        )


def state_entry(manifest: dict[str, Any], path: Path, redis_model: str) -> dict[str, Any]:
    """The `online` entry of a trainer's state checkpoint, checked to belong to `redis_model`."""
    online = manifest.get(STATE_KEY)
    if not isinstance(online, dict) or "version" not in online:
        raise TrainerConfigError(
            f"{path} is a checkpoint but not a streaming trainer's state (no {STATE_KEY!r} "
            "entry); give --state a path of its own"
        )
    if online.get("redis_model") != redis_model:
        raise TrainerConfigError(
            f"{path} is the state of published model {online.get('redis_model')!r}, not "
            f"{redis_model!r}; use another state path for this model"
        )
    return online


def online_entry(
    redis_model: str,
    point: SyncPoint,
    event_time: float,
    offsets: dict[TopicPartition, int],
    examples: int,
) -> dict[str, Any]:
    """The state checkpoint's `online` entry (see `StartingPoint.resume`)."""
    by_topic: dict[str, dict[str, int]] = {}
    for tp, offset in offsets.items():
        by_topic.setdefault(tp.topic, {})[str(tp.partition)] = offset
    return {
        "redis_model": redis_model,
        "version": point.version,
        "delta": point.delta,
        "publish_id": point.publish_id,
        "event_time": event_time if math.isfinite(event_time) else None,
        "examples": examples,
        "offsets": by_topic,
    }
