"""Push what online training changed to the Redis parameter shards: a full version, then deltas.

A delta holds the rows touched since the last sync (static tables keyed by physical row,
collisionless tables by raw id) and the ids that collisionless tables expired or evicted,
which are deleted from Redis; every `dense_every`-th delta (and any the caller asks for) also
carries the dense parameters and default rows. `serving.publisher` makes a delta one step
for readers: its changed ids are logged and its rows written, and only then does the version's
head move to it (with its dense revision, if any) at once.

A push that fails keeps what it collected: the next attempt sends that together with whatever
changed since, so no touched row and no deleted id is lost between retries. Redis failures
(down, timing out) are retried with capped exponential backoff until the push succeeds, the
caller cancels, or a deadline passes; errors that retrying cannot fix are raised at once.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import redis
import torch

from embedding_tables.collisionless import DEFAULT_ROW
from embedding_tables.idmap import EMPTY
from models.base import Model
from models.checkpoint import manifest_of
from serving.errors import RedisUnavailableError, VersionNotFoundError
from serving.manifest import TableLayout
from serving.published_model import default_rows, dense_state, publish_model, table_layouts
from serving.publisher import ParamPublisher, PublishResult
from serving.reader import ParamReader
from serving.row_encoding import ENCODINGS

log = logging.getLogger(__name__)

Result = TypeVar("Result")


class SyncError(RuntimeError):
    """A sync that did not complete: Redis kept failing until the caller's deadline or cancel
    (or no version was attached to apply it to)."""


class SyncConfigError(ValueError):
    """Sync settings that cannot work; the message says what is accepted."""


@dataclass(frozen=True)
class SyncConfig:
    """How often to push, how dense parameters ride along, how a full version is laid out, and
    how failed pushes are retried.

    `interval_s`: seconds between deltas (Monolith's 10 by default). `dense_every`: dense
    parameters go with every M-th delta. `encoding`/`num_shards`: of a full publish (deltas
    follow the live version's). `retry_initial_s`/`retry_max_s`: the backoff between attempts.
    """

    interval_s: float = 10.0
    dense_every: int = 6
    encoding: str = "fp32"
    num_shards: int | None = None
    retry_initial_s: float = 0.1
    retry_max_s: float = 2.0

    def __post_init__(self) -> None:
        if not self.interval_s > 0:
            raise SyncConfigError(f"sync interval must be > 0 seconds, got {self.interval_s}")
        if self.dense_every < 1:
            raise SyncConfigError(f"dense_every must be >= 1 deltas, got {self.dense_every}")
        if self.encoding not in ENCODINGS:
            raise SyncConfigError(
                f"unknown row encoding {self.encoding!r}; accepted: {', '.join(ENCODINGS)}"
            )
        if self.num_shards is not None and self.num_shards < 1:
            raise SyncConfigError(f"num_shards must be >= 1, got {self.num_shards}")
        if not 0 < self.retry_initial_s <= self.retry_max_s:
            raise SyncConfigError("retry delays need 0 < retry_initial_s <= retry_max_s")


@dataclass(frozen=True)
class SyncPoint:
    """Where the model stands in Redis: its version, the last delta applied to it, and the
    publish that version is (a number alone repeats after Redis loses its data)."""

    version: int
    delta: int
    publish_id: str = ""


@dataclass(frozen=True)
class SyncRecord:
    """One push that went live: a full version (delta 0) or a delta."""

    kind: str  # full | delta
    version: int
    delta: int
    publish_id: str
    rows: int
    deleted: int
    dense: bool
    attempts: int
    seconds: float
    published_at: float  # wall clock when it became readable

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "version": self.version,
            "delta": self.delta,
            "publish_id": self.publish_id,
            "rows": self.rows,
            "deleted": self.deleted,
            "dense": self.dense,
            "attempts": self.attempts,
            "seconds": round(self.seconds, 4),
            "published_at": self.published_at,
        }


# Redis errors a later attempt may not meet again; a refused password is not one of them.
_RETRYABLE = (RedisUnavailableError, redis.RedisError)
_FATAL = (redis.AuthenticationError,)


class ParamSync:
    """Keeps one model's published version in step with the model as it trains.

    Use from one thread, between training steps: it reads the model's touched rows, evicted
    ids and parameters.
    """

    def __init__(
        self,
        publisher: ParamPublisher,
        model: Model,
        config: SyncConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.publisher = publisher
        self.model = model
        self.config = config or SyncConfig()
        self.clock = clock
        self.point: SyncPoint | None = None
        self.failures = 0
        self._reader = ParamReader(publisher.nodes, publisher.model)
        self._rows: dict[str, np.ndarray] = {}
        self._deleted: dict[str, np.ndarray] = {}
        self._deltas_since_dense = 0
        self._last_push = clock()

    def due(self) -> bool:
        """Whether `interval_s` has passed since the last push."""
        return self.clock() - self._last_push >= self.config.interval_s

    @property
    def pending(self) -> bool:
        """Whether collected changes wait to be pushed."""
        return any(len(ids) for ids in (*self._rows.values(), *self._deleted.values()))

    def attach(
        self,
        origin_manifest: Mapping[str, Any] | None = None,
        resumed: SyncPoint | None = None,
        *,
        cancel: threading.Event | None = None,
        deadline: float | None = None,
    ) -> SyncRecord | None:
        """Pick the version deltas go to; publish a full version if none holds this model.

        The live version holds it when it is the trainer's own (`resumed`, from its state
        checkpoint) or the unchanged publish of the checkpoint the model was loaded from
        (`origin_manifest` equal to the published model manifest, no delta applied yet).
        Returns the full publish's record, or None when deltas continue the live version.
        """
        layouts = self._layouts()
        point, _ = self._at_store(
            lambda: self._retrying(
                "read the live version",
                lambda: self._continues(layouts, origin_manifest, resumed),
                cancel,
                deadline,
            )
        )
        if point is None:
            return self.publish_full(cancel=cancel, deadline=deadline)
        self._drain()
        self.point = point
        log.info("continuing version %d at delta %d", point.version, point.delta)
        return None

    def publish_full(
        self, *, cancel: threading.Event | None = None, deadline: float | None = None
    ) -> SyncRecord:
        """Publish every row and the dense parameters as a new version, and make it live."""
        started = self.clock()
        self._drain()
        self._rows, self._deleted = {}, {}
        publish = self._full_publish()
        result, attempts = self._at_store(
            lambda: self._retrying("publish a full version", publish, cancel, deadline)
        )
        self.point = SyncPoint(result.version, 0, result.publish_id)
        self._deltas_since_dense = 0
        self._last_push = self.clock()
        return SyncRecord(
            kind="full",
            version=result.version,
            delta=0,
            publish_id=result.publish_id,
            rows=sum(result.rows_written.values()),
            deleted=0,
            dense=True,
            attempts=attempts,
            seconds=self.clock() - started,
            published_at=time.time(),
        )

    def collect(self) -> None:
        """Take the rows touched and the ids evicted since the last call into the pending delta."""
        for name, (ids, evicted) in self._changes():
            if len(ids):
                self._rows[name] = np.union1d(self._rows.get(name, ids[:0]), ids)
                if name in self._deleted:
                    self._deleted[name] = np.setdiff1d(self._deleted[name], ids)
            if len(evicted):
                self._deleted[name] = np.union1d(self._deleted.get(name, evicted[:0]), evicted)
                if name in self._rows:
                    self._rows[name] = np.setdiff1d(self._rows[name], evicted)

    def sync(
        self,
        *,
        dense: bool = False,
        cancel: threading.Event | None = None,
        deadline: float | None = None,
    ) -> SyncRecord | None:
        """Collect and push a delta (with dense parameters if asked or due), retrying Redis
        failures; None if nothing changed and no dense push was asked for."""
        if self.point is None:
            raise SyncError("no version to apply deltas to: call attach() first")
        self.collect()
        with_dense = dense or self._deltas_since_dense + 1 >= self.config.dense_every
        if not self.pending and not dense:
            self._last_push = self.clock()
            return None
        started = self.clock()
        rows, deleted = self._values()
        parameters = self._dense_state() if with_dense else None
        defaults = self._default_rows() if with_dense else None
        version, publish_id = self.point.version, self.point.publish_id
        try:
            result, attempts = self._at_store(
                lambda: self._retrying(
                    "push a delta",
                    lambda: self.publisher.publish_delta(
                        rows=rows,
                        deleted=deleted,
                        dense=parameters,
                        default_rows=defaults,
                        version=version,
                        publish_id=publish_id,
                    ),
                    cancel,
                    deadline,
                )
            )
        except VersionNotFoundError as error:
            log.warning("%s; publishing a full version under a new publish id", error)
            return self.publish_full(cancel=cancel, deadline=deadline)
        self.point = SyncPoint(result.version, result.delta, result.publish_id)
        self._rows, self._deleted = {}, {}
        self._deltas_since_dense = 0 if with_dense else self._deltas_since_dense + 1
        self._last_push = self.clock()
        return SyncRecord(
            kind="delta",
            version=result.version,
            delta=result.delta,
            publish_id=result.publish_id,
            rows=sum(result.rows_written.values()),
            deleted=sum(result.ids_deleted.values()),
            dense=with_dense,
            attempts=attempts,
            seconds=self.clock() - started,
            published_at=time.time(),
        )

    # ---- where the model's rows and parameters come from ------------------------------------

    def _layouts(self) -> list[TableLayout]:
        return table_layouts(self.model)

    def _changes(self) -> list[tuple[str, tuple[np.ndarray, np.ndarray]]]:
        """(table, (ids touched, ids evicted)) since the last call."""
        embeddings = self.model.embeddings
        evicted = {
            name: table.evicted_ids().cpu().numpy()
            for name, table in embeddings.self_managed.items()
        }
        changes = []
        for name, rows in embeddings.take_touched_rows().items():
            if name in embeddings.self_managed:
                table = embeddings.self_managed[name]
                ids = table.ids_of_rows(rows[rows != DEFAULT_ROW]).cpu().numpy()
                ids = ids[ids != EMPTY]
            else:
                ids = rows.cpu().numpy()
            changes.append((name, (ids, evicted.pop(name, ids[:0]))))
        return changes + [(name, (ids[:0], ids)) for name, ids in evicted.items()]

    def _full_publish(self) -> Callable[[], PublishResult]:
        """What publishes the whole model (retried as one attempt)."""
        return lambda: publish_model(
            self.publisher,
            self.model,
            manifest_of(self.model),
            encoding=self.config.encoding,
            num_shards=self.config.num_shards,
        )

    def _dense_state(self) -> dict[str, torch.Tensor]:
        return dense_state(self.model)

    def _default_rows(self) -> dict[str, np.ndarray]:
        return default_rows(self.model)

    def _at_store(self, action: Callable[[], Result]) -> Result:
        """Run what talks to Redis (one process: here)."""
        return action()

    def _values(self) -> tuple[dict[str, tuple[np.ndarray, torch.Tensor]], dict[str, np.ndarray]]:
        """The pending rows as (ids, current values) and the ids to delete, per table."""
        embeddings = self.model.embeddings
        rows: dict[str, tuple[np.ndarray, torch.Tensor]] = {}
        deleted = dict(self._deleted)
        with torch.no_grad():
            for name, ids in self._rows.items():
                if name in embeddings.self_managed:
                    table = embeddings.self_managed[name]
                    physical = table.rows_of(torch.from_numpy(ids))
                    alive = (physical != DEFAULT_ROW).numpy()
                    if not alive.all():
                        deleted[name] = np.union1d(deleted.get(name, ids[:0]), ids[~alive])
                    rows[name] = (ids[alive], table.weight[physical[alive]].float())
                else:
                    weight = embeddings.tables.weight(name)
                    rows[name] = (ids, weight[torch.from_numpy(ids)].float())
        return rows, deleted

    def _drain(self) -> None:
        """Forget the model's record of touched rows and evicted ids (a full publish or a
        matching live version covers them)."""
        self.model.embeddings.take_touched_rows()
        for table in self.model.embeddings.self_managed.values():
            table.evicted_ids()

    def _continues(
        self,
        layouts: list[TableLayout],
        origin_manifest: Mapping[str, Any] | None,
        resumed: SyncPoint | None,
    ) -> SyncPoint | None:
        """The live version and its head delta if deltas may continue it, else None. Tables
        are compared by name, whatever order the model lists them in; a resumed state continues
        only the very publish it was saved at (same number and publish id)."""
        live = self.publisher.live_version()
        if live is None:
            return None
        manifest = self.publisher.manifest(live)
        if sorted(manifest.tables, key=_name) != sorted(layouts, key=_name):
            return None
        head = self._reader.head(live)
        here = SyncPoint(live, head.delta, head.publish_id)
        if resumed is not None:
            same = (resumed.version, resumed.publish_id) == (live, head.publish_id)
            return here if same else None
        if (
            origin_manifest is not None
            and head.delta == 0
            and manifest.model_manifest == json.loads(json.dumps(dict(origin_manifest)))
        ):
            return here
        return None

    def _retrying(
        self,
        what: str,
        action: Callable[[], Result],
        cancel: threading.Event | None,
        deadline: float | None,
    ) -> tuple[Result, int]:
        """(action's result, attempts), retrying Redis failures with capped backoff."""
        wait = self.config.retry_initial_s
        attempts = 0
        while True:
            attempts += 1
            try:
                return action(), attempts
            except _FATAL:
                raise
            except _RETRYABLE as error:
                self.failures += 1
                if deadline is not None and self.clock() + wait > deadline:
                    raise SyncError(
                        f"could not {what} in {attempts} attempts before the deadline: {error}"
                    ) from error
                log.warning("could not %s (attempt %d, retrying): %s", what, attempts, error)
            if cancel is None:
                time.sleep(wait)
            elif cancel.wait(wait):
                raise SyncError(f"cancelled while trying to {what}")
            wait = min(wait * 2, self.config.retry_max_s)


def _name(layout: TableLayout) -> str:
    return layout.name
