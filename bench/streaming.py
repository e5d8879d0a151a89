"""Streaming (online) training on MovieLens-1M with DCN-v2: throughput, freshness, and its value.

Everything runs on this machine's CPU against the embedded Kafka-compatible broker (Tansu) and
Redis, as `embtab stream run` would. The model is DCN-v2 with its default config (full tables,
dim 16, 3 cross layers, deep 256-128), first trained offline for `--offline-epochs` epochs on
the train split (the first 80% of events in time order), with a plain loop of the batch
trainer's own step, so that no model selection looks at the replayed period.

(a) Throughput. The replay producer and the joiner turn the validation split's events (the
    10% right after the training period, with users' full behaviour sequences) into examples
    (speedup 0: as fast as they go); then `embtab stream train` runs in a process of its own
    over that backlog. `examples_per_s` is its examples over its active
    time (first message read to the last delta live). Baseline: the offline loop's examples/s
    on the same model and batch size.
(b) Freshness. Producer and joiner (threads of this process), the trainer (a process) and a
    reader (another process, standing in for the serving process) run together while the
    first `--freshness-events` events of the validation split are replayed in real time over
    about `--freshness-seconds` seconds, clicks at once (label delay 0). The reader follows the
    model's pub/sub channel (and polls the version head as a fallback) and, for every delta,
    reads the rows it changed from the shards; freshness of a click is the wall time from its
    production (`produced_at`) to the moment the reader has read the rows of the first delta
    that covers its training. Sync interval: Monolith's 10 s unless `--sync-interval`.
(d) Per-event JSON, end to end. A producer process replays the first `--json-events` events of
    the validation split as one raw-valued JSON object per message on both topics (what a
    third-party ad server sends: `ProducerConfig(format="json")`, no watermarks, encoded
    column-wise and sent through librdkafka (confluent-kafka, `LibrdkafkaSink`: the client a
    Java or Go ad server's producer amounts to; kafka-python's pure-Python send, embtab's own
    default, takes about a core at 30,000 messages/s and would measure itself); the joiner
    (a thread here, encoding through the data set's artifact, derived watermarks) and the
    trainer (a process, sync every `--sync-interval` s) run at the same time.
    `json_events_per_s`: impressions over the wall time from the producer's start to the moment
    the trainer has applied 99% of them (the last few wait for the idle rule to close their
    windows, a fixed tail of window + lateness + idle seconds, not a rate).
(d') The joiner alone, on a backlog of the same events as per-event JSON and, as baselines,
    as JSON read 2000 messages a poll (the earlier default) and as embtab's Arrow batches:
    events over the wall time from its first message read to 99% of the impressions joined
    (summary key `json_joiner_events_per_s`; `json_vs_json_poll_2000`, `json_vs_arrow`).
(e) Freshness and trainer throughput at a 1 s sync: (b) and (a)'s trainer again with
    `--sync-interval 1` (summary keys `freshness_p99_s_sync1`, `examples_per_s_sync1`).
(c) Value of online training. The last 20% of events (validation then test split, time
    order) go through the streaming trainer's learner (`online_training.learner`, the same
    micro-batches of 4096 and step) while a copy of the offline model stays frozen; each
    window of `--window` examples is scored by both before the online model trains on it
    (progressive validation). AUCs are per window; summary values are their means.

Every process of the benchmark runs torch with `--threads` intra-op threads (1 by default):
the machine's cores are shared with other jobs, and under that load a 2-thread OpenMP region
called from a process's main thread ran 10-15x slower than a 1-thread one (measured while
writing this), which would make the baseline, not the trainer, the thing measured.

    .venv/bin/python bench/streaming.py      # writes bench/results/streaming.json
    .venv/bin/python bench/streaming.py --offline-rows 200000 --throughput-events 50000 \
        --freshness-events 20000 --freshness-seconds 30     # a brief run
    .venv/bin/python bench/streaming.py --json-only --offline-rows 20000 --offline-epochs 1
        # (d) and (d') alone, merged into the results file of a full run
"""

# ruff: noqa: E402 (the path fix below must run before the imports)
from __future__ import annotations

import sys
from pathlib import Path

# bench/serving.py is named like the `serving` package: keep bench/ off the import path.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

import argparse
import json
import multiprocessing
import os
import subprocess
import tempfile
import threading
import time
import uuid
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from embtab.machine import machine_info, write_results
from embtab.services import Services, embedded_services
from feature_store.datasets import load
from feature_store.offline import Dataset
from models.batches import BatchLoader, batch_from_columns
from models.build import build_model, plan_model
from models.checkpoint import load_checkpoint, save_checkpoint
from models.config import RunConfig, TrainConfig, to_dict
from models.metrics import auc
from models.train import dense_optimizer, seed_everything, train_step
from online_training.batching import DeliveryError
from online_training.joiner import Joiner
from online_training.joiner_config import JoinerConfig
from online_training.joiner_report import JoinerReport
from online_training.kafka import KafkaSettings, Topics, ensure_topics, stream_topic_partitions
from online_training.learner import OnlineLearner
from online_training.producer import ProducerConfig, ReplayProducer
from online_training.sync import SyncConfig
from online_training.trainer import Trainer
from online_training.trainer_config import TrainerConfig, TrainerHooks
from online_training.trainer_state import StartingPoint
from serving.keys import ModelKeys
from serving.publisher import ParamPublisher
from serving.reader import ParamReader
from serving.redis_nodes import RedisConfig, RedisNodes

RESULTS = Path(__file__).parent / "results" / "streaming.json"
DATASET = "movielens-1m"
BATCH = 4096
PARTITIONS = 4


def offline_model(dataset: Dataset, epochs: int, rows: int | None, path: Path) -> dict[str, Any]:
    """Train DCN-v2 on the train split (its first `rows`, or all) for `epochs` epochs, with no
    validation and so no selection, and save it; returns the loop's examples/s (the
    throughput baseline)."""
    run = RunConfig(dataset=DATASET)
    seed_everything(run.train.seed)
    model = build_model(plan_model(run, dataset.schema))
    optimizer = dense_optimizer(model, run.train)
    loader = BatchLoader(dataset, "train", model.schema, BATCH, shuffle=True, seed=0, rows=rows)
    examples, seconds = 0, 0.0
    for _ in range(epochs):
        started = time.perf_counter()
        for batch in loader:
            train_step(model, batch, optimizer)
            examples += batch.size
        seconds += time.perf_counter() - started
    save_checkpoint(path, model, extra={"run": to_dict(run), "dataset": DATASET})
    result = {
        "case": "offline_training",
        "model": "dcn",
        "epochs": epochs,
        "examples": examples,
        "seconds": round(seconds, 2),
        "examples_per_s": examples / seconds,
    }
    print(json.dumps(result), flush=True)
    return result


class LibrdkafkaSink:
    """A JSON replay's messages sent with librdkafka (confluent-kafka), as a high-volume
    producer sends them: acks from all in-sync replicas, batches of up to 1 MiB lingering 5 ms,
    no compression, Kafka's default (murmur2) partitioner on the request-id key."""

    def __init__(self, bootstrap: str) -> None:
        from confluent_kafka import Producer  # a test and bench dependency only

        self.producer = Producer(
            {
                "bootstrap.servers": bootstrap,
                "acks": "all",
                "linger.ms": 5,
                "batch.size": 1 << 20,
                "compression.type": "none",
                "partitioner": "murmur2_random",
                "queue.buffering.max.messages": 1_000_000,
                "delivery.report.only.error": True,
                "on_delivery": self._delivered,
            }
        )
        self.messages = 0
        self.heartbeats = 0
        self.bytes = 0
        self.failed: list[str] = []

    def _delivered(self, error, message) -> None:
        """Called for failed deliveries only (`delivery.report.only.error`)."""
        self.failed.append(str(error))

    def send_events(self, topic: str, keys: list[bytes], values: list[bytes]) -> None:
        produce = self.producer.produce
        for key, value in zip(keys, values, strict=True):
            try:
                produce(topic, value, key)
            except BufferError:  # its queue is full: let deliveries drain it, then once more
                self.producer.flush(60)
                produce(topic, value, key)
        self.messages += len(values)
        self.bytes += sum(map(len, values))
        self.producer.poll(0)

    def flush(self, timeout_s: float) -> None:
        left = self.producer.flush(timeout_s)
        if left or self.failed:
            raise DeliveryError(
                f"librdkafka did not deliver {left} messages in {timeout_s} s; "
                f"refused: {self.failed[:3]}"
            )


def _json_producer(
    bootstrap: str,
    prefix: str,
    events: int,
    go: multiprocessing.Event,
    started: multiprocessing.Queue,
) -> None:
    """The producer process of (d): ready, then on `go` its wall start time and a JSON replay
    as fast as it goes."""
    dataset = load(DATASET)
    config = ProducerConfig(split="valid", limit=events, label_delay_s=1.0, format="json")
    replay = ReplayProducer(dataset, KafkaSettings(bootstrap), Topics(prefix=prefix), config)
    started.put("ready")
    go.wait()
    sink = LibrdkafkaSink(bootstrap)
    started.put(time.time())
    report = replay.run(sink)
    started.put(report.to_dict())


def _json_trainer(
    bootstrap: str,
    prefix: str,
    redis_url: str,
    model: str,
    checkpoint: str,
    sync_interval: float,
    results: multiprocessing.Queue,
) -> None:
    """The trainer process of (d): the wall time at which each batch was applied."""
    applied: list[tuple[float, int]] = []
    trainer = _bench_trainer(
        bootstrap,
        prefix,
        redis_url,
        model,
        checkpoint,
        TrainerConfig(
            group_id="bench-json-trainer",
            idle_timeout_s=20.0,
            sync=SyncConfig(interval_s=sync_interval),
        ),
        TrainerHooks(on_applied=lambda batch: applied.append((time.time(), batch.size))),
    )
    report = trainer.run()
    results.put({"report": report.to_dict(), "applied": applied})


def _start_trainer_process(
    context: Any,
    target: Any,
    services: Services,
    topics: Topics,
    model: str,
    checkpoint: Path,
    sync_interval: float,
    results: multiprocessing.Queue,
) -> multiprocessing.Process:
    """One of the trainer processes (`_json_trainer`, `_freshness_trainer`), started."""
    trainer = context.Process(
        target=target,
        args=(
            services.kafka_bootstrap,
            topics.prefix,
            services.redis_url,
            model,
            str(checkpoint),
            sync_interval,
            results,
        ),
    )
    trainer.start()
    return trainer


def _bench_trainer(
    bootstrap: str,
    prefix: str,
    redis_url: str,
    model: str,
    checkpoint: str,
    config: TrainerConfig,
    hooks: TrainerHooks,
) -> Trainer:
    """A trainer process's Trainer: from the offline checkpoint, publishing `model`."""
    nodes = RedisNodes(RedisConfig.parse(redis_url, retries=0))
    return Trainer(
        KafkaSettings(bootstrap),
        Topics(prefix=prefix),
        StartingPoint.from_checkpoint(checkpoint),
        ParamPublisher(nodes, model),
        config,
        hooks,
    )


def _impressions_settled(report: JoinerReport) -> int:
    """The impressions a joiner is done with: joined into examples, or dropped and counted."""
    return report.examples + report.stale_impressions + report.duplicate_impressions


def json_end_to_end(
    dataset: Dataset, services: Services, checkpoint: Path, events: int, sync_interval: float
) -> dict[str, Any]:
    """(d): per-event JSON producer process -> joiner -> trainer process, all at once."""
    settings, topics = _topics(services, "json.")
    context = multiprocessing.get_context("spawn")
    trainer_results, producer_results = context.Queue(), context.Queue()
    model = f"bench-json-{uuid.uuid4().hex[:6]}"
    go = context.Event()
    producer = context.Process(
        target=_json_producer,
        args=(services.kafka_bootstrap, topics.prefix, events, go, producer_results),
    )
    producer.start()
    trainer = _start_trainer_process(
        context, _json_trainer, services, topics, model, checkpoint, sync_interval, trainer_results
    )
    joiner = Joiner(
        settings,
        topics,
        JoinerConfig(
            group_id="bench-json-joiner",
            window_s=5.0,
            allowed_lateness_s=1.0,
            idle_after_s=1.0,
        ),
        preprocessor=dataset.preprocessor(),
    )
    stop_joiner = threading.Event()
    joined = threading.Thread(target=joiner.run, args=(stop_joiner,))
    joined.start()
    assert producer_results.get(timeout=300) == "ready"
    live = ParamReader(RedisNodes(RedisConfig.parse(services.redis_url)), model)
    deadline = time.monotonic() + 300
    while live.live_version() is None:
        if time.monotonic() > deadline or not trainer.is_alive():
            raise RuntimeError("the JSON case's trainer never published its model")
        time.sleep(0.2)
    time.sleep(8.0)  # both consumer groups settle (Tansu: ~3-6 s), as in (b)
    go.set()
    started = producer_results.get(timeout=60)
    produced = producer_results.get(timeout=600)
    producer.join(timeout=60)
    # The joiner catches up; the idle rule closes the rest. An impression read after its window
    # closed is dropped (stale), a repeated one too: no example waits for those.
    deadline = time.monotonic() + 300
    while _impressions_settled(joiner.report) < produced["impressions"]:
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    stop_joiner.set()
    joined.join()
    trained = trainer_results.get(timeout=600)
    trainer.join(timeout=60)
    times = np.array([at for at, _ in trained["applied"]])
    counts = np.cumsum([size for _, size in trained["applied"]])
    target = 0.99 * produced["impressions"]
    enough = len(counts) and counts[-1] >= target
    reached = times[int(np.searchsorted(counts, target))] if enough else None
    report = trained["report"]
    result = {
        "case": "json_end_to_end",
        "events": produced["impressions"],
        "clicks": produced["actions"],
        "messages": produced["messages"],
        "producer_seconds": produced["seconds"],
        "producer_events_per_s": produced["impressions_per_s"],
        "producer_client": "librdkafka (confluent-kafka), JSON encoded column-wise",
        "joiner_examples": joiner.report.examples,
        "joiner_dead_letters": joiner.report.dlq_messages,
        "joiner_examples_per_s": joiner.report.examples_per_s,
        "joiner_rebalances": joiner.report.rebalances,
        "joiner_redelivered_messages": joiner.report.redelivered_messages,
        "joiner_stale_impressions": joiner.report.stale_impressions,
        "joiner_late_clicks": joiner.report.late_clicks,
        "trainer_examples": report["examples"],
        "trainer_examples_per_s": report["examples_per_s"],
        # A trainer put out of its group re-reads uncommitted examples (at-least-once): its
        # examples then exceed the joiner's.
        "trainer_rebalances": report["rebalances"],
        "sync_interval_s": sync_interval,
        "seconds_to_99pct_trained": None if reached is None else reached - started,
        "json_events_per_s": None if reached is None else target / (reached - started),
    }
    print(json.dumps(result), flush=True)
    return result


def backlog_join(dataset: Dataset, services: Services, events: int) -> dict[str, Any]:
    """(d'): the joiner alone on a backlog of the same events as per-event JSON and as Arrow
    batches (the baseline): the wall time from its start until 99% of the impressions are
    settled (joined, or dropped and counted); the last few wait for the idle rule instead."""
    result: dict[str, Any] = {"case": "json_backlog_join", "events": events}
    variants = {"json": ("json", {}), "json_poll_2000": ("json", {"max_poll_events": 2000})}
    variants["arrow"] = ("arrow", {})
    for name, (message_format, overrides) in variants.items():
        settings, topics = _topics(services, f"backlog-{name.replace('_', '-')}.")
        replay = ReplayProducer(
            dataset,
            settings,
            topics,
            ProducerConfig(split="valid", limit=events, label_delay_s=1.0, format=message_format),
        )
        produced = replay.run()
        joiner = Joiner(
            settings,
            topics,
            JoinerConfig(
                group_id=f"bench-backlog-{name}",
                window_s=5.0,
                allowed_lateness_s=1.0,
                idle_after_s=1.0,
                **overrides,
            ),
            preprocessor=dataset.preprocessor(),
        )
        stop_joiner = threading.Event()
        joined = threading.Thread(target=joiner.run, args=(stop_joiner,))
        load = os.getloadavg()[0]
        joined.start()
        while not (joiner.report.impressions or joiner.report.actions) and joined.is_alive():
            time.sleep(0.01)
        started = time.monotonic()
        target = 0.99 * produced.impressions
        deadline = started + 300
        while _impressions_settled(joiner.report) < target and time.monotonic() < deadline:
            time.sleep(0.05)
        seconds = time.monotonic() - started
        stop_joiner.set()
        joined.join()
        settled = _impressions_settled(joiner.report) >= target
        result[name] = {
            "max_poll_events": joiner.config.max_poll_events,
            "messages": produced.messages,
            "seconds_to_99pct": seconds if settled else None,
            "events_per_s": target / seconds if settled else None,
            "joiner_examples": joiner.report.examples,
            "joiner_stale_impressions": joiner.report.stale_impressions,
            "joiner_dead_letters": joiner.report.dlq_messages,
            "load_average_1min": load,
        }
    rates = {name: result[name]["events_per_s"] for name in variants}
    for baseline in ("arrow", "json_poll_2000"):
        ratio = rates["json"] / rates[baseline] if rates["json"] and rates[baseline] else None
        result[f"json_vs_{baseline}"] = ratio
    print(json.dumps(result), flush=True)
    return result


def _topics(services: Services, prefix: str) -> tuple[KafkaSettings, Topics]:
    settings = KafkaSettings(services.kafka_bootstrap)
    topics = Topics(prefix=prefix)
    ensure_topics(settings, stream_topic_partitions(topics, PARTITIONS))
    return settings, topics


def throughput(
    dataset: Dataset,
    services: Services,
    checkpoint: Path,
    events: int | None,
    sync_interval: float,
    prefix: str = "throughput.",
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(a): producer and joiner fill the examples topic, then the trainer process drains it."""
    settings, topics = _topics(services, prefix)
    replay = ReplayProducer(
        dataset, settings, topics, ProducerConfig(split="valid", limit=events), online=None
    )
    joiner = Joiner(
        settings, topics, JoinerConfig(group_id=f"bench-joiner-{prefix}", window_s=60.0)
    )
    joined = threading.Thread(target=joiner.run)
    joined.start()
    produced = replay.run()
    joined.join()
    feed = {
        "case": "throughput_produce_join",
        "events": produced.impressions,
        "producer_events_per_s": produced.impressions_per_s,
        "joiner_examples": joiner.report.examples,
        "joiner_examples_per_s": joiner.report.examples_per_s,
    }
    print(json.dumps(feed), flush=True)
    command = [sys.executable, "-m", "embtab.cli", "stream", "train"]
    command += ["--checkpoint", str(checkpoint), "--name", f"bench-{prefix.rstrip('.')}"]
    command += ["--sync-interval", str(sync_interval), "--batch-size", str(BATCH)]
    command += ["--kafka", services.kafka_bootstrap, "--redis", services.redis_url]
    command += ["--topic-prefix", topics.prefix, "--group", "bench-trainer", "--json"]
    finished = subprocess.run(command, capture_output=True, text=True, check=True)
    report = json.loads(finished.stdout)
    trained = {
        "case": "throughput_trainer",
        "sync_interval_s": sync_interval,
        "command": " ".join(command[1:]).replace(str(checkpoint), "<offline checkpoint>"),
        "examples": report["examples"],
        "active_seconds": round(report["active_seconds"], 3),
        "train_seconds": round(report["train_seconds"], 3),
        "examples_per_s": report["examples_per_s"],
        "examples_per_train_second": report["examples"] / report["train_seconds"],
        "batches": report["batches"],
        "deltas": report["deltas"],
        "rows_pushed": report["rows_pushed"],
        "dead_letters": report["dlq_messages"],
    }
    print(json.dumps(trained), flush=True)
    return feed, trained


def _freshness_trainer(
    bootstrap: str,
    prefix: str,
    redis_url: str,
    model: str,
    checkpoint: str,
    sync_interval: float,
    results: multiprocessing.Queue,
) -> None:
    """The trainer process of (b): records, per delta, the production times of the clicks
    whose training it covers."""
    pending: list[np.ndarray] = []
    covered: list[tuple[int, int, float, list[float]]] = []

    def on_applied(batch) -> None:
        produced = batch.rows.column("produced_at").to_numpy()
        pending.append(produced[batch.labels == 1])

    def on_synced(record) -> None:
        clicks = np.concatenate(pending).tolist() if pending else []
        covered.append((record.version, record.delta, record.published_at, clicks))
        pending.clear()

    trainer = _bench_trainer(
        bootstrap,
        prefix,
        redis_url,
        model,
        checkpoint,
        TrainerConfig(
            group_id=f"bench-fresh-trainer-{prefix}", sync=SyncConfig(interval_s=sync_interval)
        ),
        TrainerHooks(on_applied=on_applied, on_synced=on_synced),
    )
    report = trainer.run()
    results.put({"report": report.to_dict(), "covered": covered})


def _serving_reader(
    redis_url: str, model: str, stop: multiprocessing.Event, results: multiprocessing.Queue
) -> None:
    """The reader process of (b): for every new version or delta, read the rows it changed, as
    a server refreshing its cache would, and note when they were read."""
    nodes = RedisNodes(RedisConfig.parse(redis_url))
    reader = ParamReader(nodes, model)
    subscription = nodes.meta.pubsub(ignore_subscribe_messages=True)
    subscription.subscribe(ModelKeys(model).events)
    manifests: dict[int, Any] = {}
    done: dict[int, int] = {}
    seen: list[tuple[int, int, float, int]] = []

    def catch_up(version: int, delta: int) -> None:
        if version not in manifests:
            manifests[version] = reader.manifest(version)
            done[version] = 0
            seen.append((version, 0, time.time(), 0))
        for number in range(done[version] + 1, delta + 1):
            changed = reader.delta_log(version, number)
            if changed is None:  # reserved by a push that failed: never committed
                continue
            rows = reader.fetch_rows(manifests[version], changed)
            seen.append((version, number, time.time(), sum(len(r.found) for r in rows.values())))
        done[version] = max(done[version], delta)

    last_poll = 0.0
    while not stop.is_set():
        message = subscription.get_message(timeout=0.05)
        if message is not None:
            event = json.loads(message["data"])
            catch_up(int(event["version"]), int(event.get("delta") or 0))
        if time.monotonic() - last_poll >= 0.5:
            last_poll = time.monotonic()
            version = reader.live_version()
            if version is not None:
                catch_up(version, reader.head(version).delta)
    results.put(seen)


def freshness(
    dataset: Dataset,
    services: Services,
    checkpoint: Path,
    events: int,
    seconds: float,
    sync_interval: float,
) -> dict[str, Any]:
    """(b): click produced -> its updated rows read by a separate reader process."""
    settings, topics = _topics(services, f"freshness-{sync_interval:g}.")
    model = f"bench-fresh-{uuid.uuid4().hex[:6]}"
    times = dataset.read("valid", [dataset.schema.time_column]).column(0).to_numpy()[:events]
    speedup = float(times[-1] - times[0]) / seconds
    context = multiprocessing.get_context("spawn")
    trainer_results, reader_results = context.Queue(), context.Queue()
    stop_reader = context.Event()
    reader = context.Process(
        target=_serving_reader, args=(services.redis_url, model, stop_reader, reader_results)
    )
    reader.start()
    trainer = _start_trainer_process(
        context,
        _freshness_trainer,
        services,
        topics,
        model,
        checkpoint,
        sync_interval,
        trainer_results,
    )
    joiner = Joiner(
        settings,
        topics,
        JoinerConfig(group_id=f"bench-fresh-joiner-{topics.prefix}", window_s=60.0),
    )
    joined = threading.Thread(target=joiner.run)
    joined.start()
    live = ParamReader(RedisNodes(RedisConfig.parse(services.redis_url)), model)
    deadline = time.monotonic() + 300
    while live.live_version() is None:
        if time.monotonic() > deadline or not trainer.is_alive():
            raise RuntimeError("the freshness trainer never published its model")
        time.sleep(0.2)
    time.sleep(8.0)  # the trainer's and the joiner's consumer groups settle (Tansu: ~3-6 s)
    replay = ReplayProducer(
        dataset,
        settings,
        topics,
        ProducerConfig(split="valid", limit=events, speedup=speedup, label_delay_s=0.0),
        online=None,
    )
    produced = replay.run()
    joined.join()
    trained = trainer_results.get(timeout=600)
    trainer.join(timeout=60)
    time.sleep(1.0)
    stop_reader.set()
    seen = reader_results.get(timeout=60)
    reader.join(timeout=60)

    seen_at = {(version, delta): at for version, delta, at, _ in seen}
    ages, pickups, missing = [], [], 0
    for version, delta, published_at, clicks in trained["covered"]:
        if (version, delta) not in seen_at:
            missing += len(clicks)
            continue
        ages.extend(seen_at[(version, delta)] - produced_at for produced_at in clicks)
        pickups.append(seen_at[(version, delta)] - published_at)
    ages = np.asarray(ages)
    report = trained["report"]
    result = {
        "case": "freshness",
        "events": produced.impressions,
        "speedup": speedup,
        "events_per_s": produced.impressions / produced.seconds,
        "clicks_measured": len(ages),
        "clicks_not_seen": missing,
        "deltas": report["deltas"],
        "sync_interval_s": sync_interval,
        "freshness_p50_s": float(np.percentile(ages, 50)),
        "freshness_p90_s": float(np.percentile(ages, 90)),
        "freshness_p99_s": float(np.percentile(ages, 99)),
        "freshness_max_s": float(ages.max()),
        "reader_pickup_p50_s": float(np.percentile(pickups, 50)),
        "reader_pickup_max_s": float(np.max(pickups)),
        "trainer_examples": report["examples"],
        "trainer_dead_letters": report["dlq_messages"],
        "joiner_examples": joiner.report.examples,
    }
    print(json.dumps(result), flush=True)
    return result


def _replay_rows(dataset: Dataset) -> pa.RecordBatch:
    """The last 20% of events in time order (validation, then test) as example rows."""
    schema = dataset.schema
    columns = [spec.name for spec in schema.features] + [schema.label, schema.time_column]
    table = pa.concat_tables([dataset.read(split, columns) for split in ("valid", "test")])
    table = table.combine_chunks()
    rows = {name: table.column(name).chunk(0) for name in columns[:-2]}
    rows["label"] = pa.array(table.column(schema.label).to_numpy().astype(np.int8))
    rows["event_time"] = pa.array(table.column(schema.time_column).to_numpy().astype(np.float64))
    return pa.RecordBatch.from_pydict(rows)


@torch.no_grad()
def _scores(model, rows: pa.RecordBatch) -> np.ndarray:
    columns = {name: rows.column(name) for name in model.sparse_features + model.dense_features}
    batch = batch_from_columns(columns, model.schema, with_labels=False)
    return model(batch.sparse, batch.dense).float().numpy()


def online_vs_frozen(dataset: Dataset, checkpoint: Path, window: int) -> dict[str, Any]:
    """(c): progressive validation of the online model against the frozen offline one."""
    rows = _replay_rows(dataset)
    frozen = load_checkpoint(checkpoint).model.eval()
    online = load_checkpoint(checkpoint).model
    learner = OnlineLearner(online, TrainConfig(), auc_window=window)
    labels, online_scores, frozen_scores = [], [], []
    started = time.perf_counter()
    for start in range(0, rows.num_rows, BATCH):
        chunk = rows.slice(start, BATCH)
        frozen_scores.append(_scores(frozen, chunk))
        applied = learner.apply(chunk)
        labels.append(applied.labels)
        online_scores.append(applied.scores)
    seconds = time.perf_counter() - started
    labels = np.concatenate(labels)
    online_scores, frozen_scores = np.concatenate(online_scores), np.concatenate(frozen_scores)
    times = rows.column("event_time").to_numpy()
    windows = []
    for start in range(0, len(labels) - window + 1, window):
        part = slice(start, start + window)
        windows.append(
            {
                "window": len(windows),
                "first_event_time": float(times[part][0]),
                "last_event_time": float(times[part][-1]),
                "positive_rate": float(labels[part].mean()),
                "online_auc": auc(labels[part], online_scores[part]),
                "frozen_auc": auc(labels[part], frozen_scores[part]),
            }
        )
    online_mean = float(np.mean([w["online_auc"] for w in windows]))
    frozen_mean = float(np.mean([w["frozen_auc"] for w in windows]))
    result = {
        "case": "online_vs_frozen",
        "examples": int(len(labels)),
        "window": window,
        "seconds": round(seconds, 2),
        "online_auc_mean": online_mean,
        "frozen_auc_mean": frozen_mean,
        "online_auc_all": auc(labels, online_scores),
        "frozen_auc_all": auc(labels, frozen_scores),
        "windows_online_better": sum(w["online_auc"] > w["frozen_auc"] for w in windows),
        "windows": windows,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "windows"}), flush=True)
    return result


def json_only(dataset: Dataset, host: dict[str, Any], arguments: argparse.Namespace) -> int:
    """`--json-only`: (d) alone, merged into the results file of a full run: its entry and
    `json_events_per_s` are replaced; `full_run` keeps the machine, command and date that the
    other cases' results came from."""
    document = json.loads(arguments.out.read_text())
    with tempfile.TemporaryDirectory(prefix="embtab-bench-") as scratch:
        checkpoint = Path(scratch) / "dcn-offline.safetensors"
        offline_model(dataset, arguments.offline_epochs, arguments.offline_rows, checkpoint)
        with embedded_services() as services:
            json_case = json_end_to_end(
                dataset, services, checkpoint, arguments.json_events, arguments.sync_interval
            )
            backlog = backlog_join(dataset, services, arguments.json_events)
    host["load_average_1min_at_end"] = os.getloadavg()[0]
    replaced = {json_case["case"], backlog["case"]}
    results = [r for r in document["results"] if r["case"] not in replaced]
    full_run = document.get("full_run") or {
        key: document[key] for key in ("machine", "command", "date", "config")
    }
    write_results(
        arguments.out,
        host,
        [*results, json_case, backlog],
        {
            **document["summary"],
            "json_events_per_s": json_case["json_events_per_s"],
            "json_joiner_events_per_s": backlog["json"]["events_per_s"],
        },
        config={key: value for key, value in vars(arguments).items() if key != "out"},
        full_run=full_run,
    )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--offline-epochs", type=int, default=2)
    parser.add_argument("--offline-rows", type=int, help="train offline on the first N rows")
    parser.add_argument(
        "--throughput-events", type=int, help="replay only the first N validation events in (a)"
    )
    parser.add_argument("--freshness-events", type=int, default=60_000)
    parser.add_argument("--freshness-seconds", type=float, default=90.0)
    parser.add_argument("--sync-interval", type=float, default=10.0)
    parser.add_argument("--window", type=int, default=10_000)
    parser.add_argument("--json-events", type=int, default=100_000, help="events replayed in (d)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument(
        "--json-only",
        action="store_true",
        help="run only (d) (after the offline model it starts from) and update its result and "
        "summary key in --out, keeping the other cases' results there",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    arguments = parser.parse_args()
    # Children (the trainer and reader processes) read it when torch starts.
    os.environ["OMP_NUM_THREADS"] = str(arguments.threads)
    torch.set_num_threads(arguments.threads)
    host = machine_info()
    dataset = load(DATASET)
    if arguments.json_only:
        return json_only(dataset, host, arguments)
    results = []
    with tempfile.TemporaryDirectory(prefix="embtab-bench-") as scratch:
        checkpoint = Path(scratch) / "dcn-offline.safetensors"
        offline = offline_model(
            dataset, arguments.offline_epochs, arguments.offline_rows, checkpoint
        )
        results.append(offline)
        with embedded_services() as services:
            feed, trained = throughput(
                dataset, services, checkpoint, arguments.throughput_events, arguments.sync_interval
            )
            results += [feed, trained]
            fresh = freshness(
                dataset,
                services,
                checkpoint,
                arguments.freshness_events,
                arguments.freshness_seconds,
                arguments.sync_interval,
            )
            results.append(fresh)
            json_case = json_end_to_end(
                dataset, services, checkpoint, arguments.json_events, arguments.sync_interval
            )
            results.append(json_case)
            backlog = backlog_join(dataset, services, arguments.json_events)
            results.append(backlog)
            _, trained_sync1 = throughput(
                dataset,
                services,
                checkpoint,
                arguments.throughput_events,
                1.0,
                prefix="throughput-sync1.",
            )
            results.append(trained_sync1)
            fresh_sync1 = freshness(
                dataset,
                services,
                checkpoint,
                arguments.freshness_events,
                arguments.freshness_seconds,
                1.0,
            )
            results.append(fresh_sync1)
        value = online_vs_frozen(dataset, checkpoint, arguments.window)
        results.append(value)
    host["load_average_1min_at_end"] = os.getloadavg()[0]
    summary = {
        "examples_per_s": trained["examples_per_s"],
        "freshness_p50_s": fresh["freshness_p50_s"],
        "freshness_p99_s": fresh["freshness_p99_s"],
        "sync_interval_s": arguments.sync_interval,
        "online_auc": value["online_auc_mean"],
        "frozen_auc": value["frozen_auc_mean"],
        "trainer_vs_offline_loop": trained["examples_per_s"] / offline["examples_per_s"],
        "online_minus_frozen_auc": value["online_auc_mean"] - value["frozen_auc_mean"],
        "json_events_per_s": json_case["json_events_per_s"],
        "json_joiner_events_per_s": backlog["json"]["events_per_s"],
        "freshness_p99_s_sync1": fresh_sync1["freshness_p99_s"],
        "examples_per_s_sync1": trained_sync1["examples_per_s"],
    }
    write_results(
        arguments.out,
        host,
        results,
        summary,
        config={
            "dataset": DATASET,
            "model": "dcn (default config: full tables, dim 16)",
            "batch": BATCH,
            "partitions": PARTITIONS,
            **{key: value for key, value in vars(arguments).items() if key != "out"},
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
