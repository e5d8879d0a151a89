"""The demo's stages, in order: offline training (compressed and full), publish, serve, and the
replay of the last 20% through Kafka while a client scores against the live service.

Every stage's outcome (ok, failed with why, or not reached) lands in `DemoRun`, so the report
says what finished even after a failure or Ctrl-C. Every process and thread started here is
stopped in a `finally`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from embtab.demo.config import DemoConfig, DemoError
from embtab.demo.console import StatusLine
from embtab.demo.load import LoadClient, request_bodies
from embtab.services import Services, free_port
from feature_store.offline import Dataset
from feature_store.online import NoOnlineLayout, OnlineFeatureStore, OnlineLayout
from models.batches import batch_from_columns
from models.checkpoint import load_checkpoint
from models.config import run_config_from_dict
from models.metrics import auc
from models.train import train
from online_training.joiner import Joiner
from online_training.joiner_config import JoinerConfig
from online_training.kafka import KafkaSettings, Topics, ensure_topics, stream_topic_partitions
from online_training.learner import AppliedBatch
from online_training.pipeline import PipelineConfig, StreamPipeline
from online_training.producer import ProducerConfig, ReplayProducer
from online_training.sync import SyncConfig, SyncRecord
from online_training.trainer import Trainer
from online_training.trainer_config import TrainerConfig, TrainerHooks
from online_training.trainer_state import StartingPoint
from serving.published_model import publish_checkpoint
from serving.publisher import ParamPublisher
from serving.redis_nodes import RedisConfig, RedisNodes

MODEL_NAME = "demo-dcn"
PARTITIONS = 4
SERVE_START_ATTEMPTS = 3
SERVE_READY_TIMEOUT_S = 120.0


class StageError(RuntimeError):
    """A stage that could not finish; the report names it and its cause."""


class ReplayCancelled(RuntimeError):
    """Raised in the producer's pacing sleep once the replay is stopped (Ctrl-C, a failure)."""


@dataclass
class DemoRun:
    """What was measured, stage by stage."""

    config: DemoConfig
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    offline: dict[str, dict[str, Any]] = field(default_factory=dict)
    published: dict[str, Any] = field(default_factory=dict)
    windows: list[dict[str, Any]] = field(default_factory=list)
    freshness_s: list[float] = field(default_factory=list)
    latencies: list[tuple[float, float]] = field(default_factory=list)
    load_errors: int = 0
    stream: list[dict[str, Any]] = field(default_factory=list)
    throughput: list[tuple[float, int]] = field(default_factory=list)
    interrupted: bool = False
    offline_checkpoint: Path | None = None

    @property
    def failed(self) -> list[str]:
        return [name for name, stage in self.stages.items() if stage["status"] != "ok"]

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        started = time.monotonic()
        self.stages[name] = {"status": "running"}
        try:
            yield
        except KeyboardInterrupt:
            self.stages[name] = {"status": "interrupted", "error": "Ctrl-C"}
            self.interrupted = True
            raise
        except Exception as error:
            self.stages[name] = {
                "status": "failed",
                "error": f"{type(error).__name__}: {error}",
                "trace": traceback.format_exc(limit=6),
            }
            raise StageError(f"stage {name!r} failed: {error}") from error
        self.stages[name] = {"status": "ok", "seconds": round(time.monotonic() - started, 1)}


def has_online_layout(dataset: Dataset) -> bool:
    """Whether an online feature store holds this data set's user and item features."""
    try:
        OnlineLayout.for_schema(dataset.schema, dataset.preprocessor())
    except NoOnlineLayout:
        return False
    return True


def _memory_per_table(model) -> dict[str, int]:
    return {name: int(size) for name, size in model.embeddings.memory_bytes().items()}


def train_offline(run: DemoRun, dataset: Dataset, scratch: Path, progress: bool) -> Path:
    """DCN-v2 on the train split, compressed and full, each tested on the test split."""
    config = run.config
    train_options = {
        "epochs": config.epochs,
        "train_rows": config.train_rows,
        "eval_rows": config.eval_rows,
        "batch_size": config.offline_batch_size,
        "sparse_lr": config.sparse_lr,
        "threads": 1,
    }
    paths = {}
    for variant, tables in (("compressed", config.tables.tables), ("full", {})):
        raw = {"dataset": config.dataset, "model": {"name": "dcn"}, "train": train_options}
        if tables:
            raw["tables"] = tables
        path = scratch / f"dcn-{variant}.safetensors"
        started = time.monotonic()
        result = train(run_config_from_dict(raw), dataset, path, progress=progress)
        run.offline[variant] = {
            "test_auc": float(result.test["auc"]),
            "test_logloss": float(result.test.get("logloss", float("nan"))),
            "memory_bytes": _memory_per_table(result.model),
            "examples_per_s": result.fit.examples_per_second,
            "seconds": round(time.monotonic() - started, 1),
        }
        paths[variant] = path
        print(f"offline {variant}: test AUC {run.offline[variant]['test_auc']:.4f}", flush=True)
    return paths["compressed"]


def publish(run: DemoRun, services: Services, checkpoint: Path, dataset: Dataset) -> None:
    """The compressed checkpoint to the Redis shards, and the online features serving reads."""
    nodes = RedisNodes(RedisConfig.parse(services.redis_url, socket_timeout_s=30.0))
    try:
        result = publish_checkpoint(
            ParamPublisher(nodes, MODEL_NAME), str(checkpoint), num_shards=4
        )
        written = 0
        if has_online_layout(dataset):
            store = OnlineFeatureStore(
                nodes.meta,
                load_checkpoint(checkpoint).model.schema,
                preprocessing=dataset.preprocessor(),
            )
            written = store.write_prepared(
                dataset.iter_batches("train", 50_000), run.config.online_store_rows or None
            ).rows
        run.published = {
            "version": result.version,
            "rows": result.rows_written,
            "dense_bytes": result.dense_bytes,
            "online_store_events": written,
        }
    finally:
        nodes.close()


class ScoringService:
    """`embtab serve` in its own process, on a free port (another one if it was taken)."""

    def __init__(self, redis_url: str, log_path: Path) -> None:
        self.redis_url = redis_url
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self.port = 0

    def start(self) -> None:
        for _ in range(SERVE_START_ATTEMPTS):
            self.port = free_port()
            command = [sys.executable, "-m", "embtab.cli", "serve", "--model", MODEL_NAME]
            command += ["--port", str(self.port)]
            # The URL may hold a password: in the environment, not on a command line that
            # every local user can read.
            environment = {**os.environ, "EMBTAB_REDIS": self.redis_url}
            with self.log_path.open("ab") as log:
                self.process = subprocess.Popen(
                    command,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    env=environment,
                )
            if self._wait_ready():
                return
            self.stop()
        last_log = self.log_path.read_text(errors="replace")[-2000:]
        raise StageError(
            f"embtab serve did not become ready after {SERVE_START_ATTEMPTS} tries; "
            f"its log ends:\n{last_log}"
        )

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + SERVE_READY_TIMEOUT_S
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=1):
                    return True
            except (urllib.error.URLError, OSError):
                time.sleep(0.3)
        return False

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


class ProgressiveRecorder:
    """Trainer hooks: each batch's online scores (before its update) next to the frozen model's
    scores, and click production times until the delta that covers them is live."""

    def __init__(self, frozen, started: float) -> None:
        self.frozen = frozen.eval()
        self.started = started
        self.labels: list[np.ndarray] = []
        self.online: list[np.ndarray] = []
        self.frozen_scores: list[np.ndarray] = []
        self.pending: list[np.ndarray] = []
        self.freshness_s: list[float] = []
        self.throughput: list[tuple[float, int]] = []
        self.examples = 0

    @torch.no_grad()
    def on_applied(self, batch: AppliedBatch) -> None:
        names = self.frozen.sparse_features + self.frozen.dense_features
        columns = {name: batch.rows.column(name) for name in names}
        features = batch_from_columns(columns, self.frozen.schema, with_labels=False)
        self.frozen_scores.append(self.frozen(features.sparse, features.dense).float().numpy())
        self.labels.append(np.asarray(batch.labels))
        self.online.append(np.asarray(batch.scores))
        produced = batch.rows.column("produced_at").to_numpy()
        self.pending.append(produced[np.asarray(batch.labels) == 1])
        self.examples += batch.size
        self.throughput.append((time.monotonic() - self.started, self.examples))

    def on_synced(self, record: SyncRecord) -> None:
        if self.pending:
            clicks = np.concatenate(self.pending)
            self.freshness_s.extend((record.published_at - clicks).tolist())
        self.pending.clear()

    def windows(self, window: int, split: str) -> list[dict[str, Any]]:
        if not self.labels:
            return []
        labels = np.concatenate(self.labels)
        online, frozen = np.concatenate(self.online), np.concatenate(self.frozen_scores)
        result = []
        for start in range(0, len(labels) - window + 1, window):
            part = slice(start, start + window)
            if labels[part].min() == labels[part].max():
                continue
            result.append(
                {
                    "split": split,
                    "examples": window,
                    "online_auc": auc(labels[part], online[part]),
                    "frozen_auc": auc(labels[part], frozen[part]),
                }
            )
        return result


def _topics(services: Services, prefix: str) -> tuple[KafkaSettings, Topics]:
    settings = KafkaSettings(services.kafka_bootstrap)
    topics = Topics(prefix=prefix)
    ensure_topics(settings, stream_topic_partitions(topics, PARTITIONS))
    return settings, topics


def _speedup(dataset: Dataset, split: str, limit: int | None, seconds: float) -> float:
    times = dataset.read(split, [dataset.schema.time_column]).column(0).to_numpy()
    times = times[:limit] if limit else times
    span = float(times[-1] - times[0]) if len(times) > 1 else 0.0
    return span / seconds if span > 0 else 0.0


def replay_split(
    run: DemoRun,
    services: Services,
    dataset: Dataset,
    start: StartingPoint,
    split: str,
    index: int,
    status: StatusLine,
) -> None:
    """producer -> joiner -> online trainer -> delta sync for one split, live on the console."""
    config = run.config
    settings, topics = _topics(services, f"demo{index}-{split}.")
    frozen = load_checkpoint(run.offline_checkpoint).model
    recorder = ProgressiveRecorder(frozen, time.monotonic())
    nodes = RedisNodes(RedisConfig.parse(services.redis_url, socket_timeout_s=5.0, retries=0))
    trainer = Trainer(
        settings,
        topics,
        start,
        ParamPublisher(nodes, MODEL_NAME),
        TrainerConfig(
            group_id=f"demo-trainer-{index}",
            batch_size=config.batch_size,
            auc_window=config.window,
            sync=SyncConfig(interval_s=config.sync_interval_s),
        ),
        TrainerHooks(on_applied=recorder.on_applied, on_synced=recorder.on_synced),
    )
    joiner = Joiner(settings, topics, JoinerConfig(group_id=f"demo-joiner-{index}", window_s=60.0))
    stop = threading.Event()

    def paced_sleep(seconds: float) -> None:
        if stop.wait(seconds):
            raise ReplayCancelled("the replay was stopped")

    producer = ReplayProducer(
        dataset,
        settings,
        topics,
        ProducerConfig(
            split=split,
            limit=config.replay_limit,
            speedup=_speedup(dataset, split, config.replay_limit, config.replay_seconds),
            label_delay_s=0.0,
            flush_timeout_s=10.0,
        ),
        online=None,
        sleep=paced_sleep,
    )
    pipeline = StreamPipeline(trainer, joiner, producer, PipelineConfig(settle_s=5.0))
    status.attach(split, trainer)
    try:
        reports = pipeline.run(stop)
    except Exception as failure:  # a stage's own error, re-raised by the pipeline
        raise StageError(f"{type(failure).__name__}: {failure}") from failure
    finally:
        status.detach()
        nodes.close()
        run.windows.extend(recorder.windows(config.window, split))
        run.freshness_s.extend(recorder.freshness_s)
        offset = run.throughput[-1][0] if run.throughput else 0.0
        run.throughput.extend((offset + at, count) for at, count in recorder.throughput)
    report = reports.trainer
    run.stream.append(
        {
            "split": split,
            "events": reports.producer.impressions,
            "joined": reports.joiner.examples,
            "trained": report.examples,
            "examples_per_s": report.examples_per_s,
            "deltas": report.deltas,
            "rows_pushed": report.rows_pushed,
            "dead_letters": report.dlq_messages,
            "full_publishes": report.full_publishes,
        }
    )


def check_roles(dataset: Dataset) -> None:
    """The stream and the scoring requests are keyed by the data set's user and item columns."""
    if not {"user", "item"} <= dataset.schema.id_columns.keys():
        raise DemoError(
            f"the prepared {dataset.name} names no user and item id columns (a copy prepared by "
            f"an older embtab?); prepare it again: embtab data prepare {dataset.name}"
        )


def run_demo_stages(run: DemoRun, services: Services, dataset: Dataset, progress: bool) -> None:
    """Every stage in order; raises StageError at the first failure (recorded in `run`)."""
    config = run.config
    with tempfile.TemporaryDirectory(prefix="embtab-demo-") as scratch:
        with run.stage("offline training"):
            checkpoint = train_offline(run, dataset, Path(scratch), progress)
            run.offline_checkpoint = checkpoint
        with run.stage("publish"):
            publish(run, services, checkpoint, dataset)
        service = ScoringService(services.redis_url, Path(scratch) / "serve.log")
        client: LoadClient | None = None
        status = StatusLine(lambda: client.recent_p99_ms() if client else None)
        try:
            with run.stage("serve"):
                service.start()
                bodies = request_bodies(
                    dataset,
                    500,
                    config.candidates,
                    with_context=not has_online_layout(dataset),
                )
                client = LoadClient(service.port, bodies)
                client.start()
            status.start()
            with run.stage("stream replay"):
                start = StartingPoint.from_checkpoint(checkpoint)
                for index, split in enumerate(config.replay_splits):
                    replay_split(run, services, dataset, start, split, index, status)
                    start = StartingPoint(model=start.model)
        finally:
            status.stop()
            if client is not None:
                client.stop()
                run.latencies = list(client.samples)
                run.load_errors = client.errors
            service.stop()
