"""`embtab stream produce|join|train|run`: live traffic in, labelled examples, online training.

`produce` replays a data set as traffic, `join` turns impressions and clicks into examples,
`train` trains a model on the examples and keeps its published version in Redis fresh, and
`run` does all three at once, with live counters. Each uses the Kafka (and Redis) named by
--kafka / --redis, else EMBTAB_KAFKA / EMBTAB_REDIS, else embedded ones started for the
duration of the command. SASL/SSL settings come from the EMBTAB_KAFKA_* variables (see
online_training.kafka).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from embtab.commands.data import load_with_progress
from embtab.config import load_run_config, parse_override
from embtab.output import emit
from embtab.services import Services, embedded_services, stop_on_signals
from feature_store.offline import Dataset
from feature_store.online import (
    NAMESPACE,
    NoOnlineLayout,
    OnlineFeatureStore,
)
from models.build import build_model, graphhash_mappings, plan_model
from models.config import MODEL_CONFIGS, TrainConfig, train_config_of_run
from models.distributed import DistributedConfig
from models.sharded_checkpoint import ShardedCheckpoint
from models.train import seed_everything
from online_training.events import FORMATS
from online_training.joiner import Joiner
from online_training.joiner_config import JoinerConfig
from online_training.kafka import (
    ENVIRONMENT,
    KafkaSettings,
    Topics,
    ensure_topics,
    stream_topic_partitions,
)
from online_training.pipeline import StreamPipeline
from online_training.producer import PRODUCER_FORMATS, ProducerConfig, ReplayProducer
from online_training.sharded_trainer import ShardedStreamJob, train_stream_distributed
from online_training.sync import SyncConfig
from online_training.trainer import Trainer
from online_training.trainer_config import TrainerConfig
from online_training.trainer_state import StartingPoint
from serving.keys import check_name
from serving.publisher import ParamPublisher
from serving.redis_nodes import RedisConfig, RedisNodes, redact_url
from serving.row_encoding import ENCODINGS


def _add_replay_arguments(parser: argparse.ArgumentParser) -> None:
    """What `produce` and `run` replay, and how fast."""
    parser.add_argument("--dataset", default="movielens-1m", help="data set to replay")
    parser.add_argument("--split", default="test", help="train, valid or test")
    parser.add_argument(
        "--speedup", type=float, default=0.0, help="event seconds per second (0: at once)"
    )
    parser.add_argument(
        "--label-delay", type=float, default=0.0, help="event seconds from impression to click"
    )
    parser.add_argument("--limit", type=int, help="replay only the first N events")


def register(commands: argparse._SubParsersAction) -> None:
    stream = commands.add_parser("stream", help="streaming: replay traffic, join clicks")
    actions = stream.add_subparsers(dest="action", required=True, metavar="ACTION")

    produce = actions.add_parser(
        "produce", help="replay a data set as live traffic (and its online features to Redis)"
    )
    _add_replay_arguments(produce)
    produce.add_argument("--batch-rows", type=int, default=2048, help="rows per Kafka message")
    produce.add_argument("--run-id", type=int, help="request ids start at run_id << 32")
    produce.add_argument(
        "--format",
        choices=PRODUCER_FORMATS,
        default="arrow",
        help="arrow: embtab's batches with watermarks; json: one JSON object per event with "
        "raw values, keyed by request id, as a third-party producer sends (docs/streaming.md)",
    )
    produce.add_argument(
        "--no-online-features", action="store_true", help="do not write features to Redis"
    )
    produce.add_argument("--redis", help="Redis URL (default: EMBTAB_REDIS or embedded)")
    produce.add_argument(
        "--redis-namespace", default=NAMESPACE, help="prefix of the online feature keys"
    )
    _add_kafka_arguments(produce)
    produce.set_defaults(run=run_produce)

    join = actions.add_parser("join", help="join impressions and clicks into examples")
    join.add_argument(
        "--window", type=float, default=60.0, help="event seconds an impression waits for a click"
    )
    join.add_argument(
        "--dataset",
        help="accept only feature-log batches with this data set's features; its preprocessing "
        "artifact encodes JSON events",
    )
    _add_join_arguments(join)
    join.add_argument("--group", help="Kafka consumer group (default: <topic prefix>embtab-joiner)")
    join.add_argument("--batch-rows", type=int, default=2048, help="examples per Kafka message")
    join.add_argument(
        "--max-pending", type=int, default=1_000_000, help="impressions kept for joining"
    )
    join.add_argument(
        "--idle-timeout", type=float, help="stop after this many seconds without input"
    )
    join.add_argument(
        "--follow", action="store_true", help="keep joining after the stream's end markers"
    )
    _add_kafka_arguments(join)
    join.set_defaults(run=run_join)

    train = actions.add_parser(
        "train", help="train a model on the examples topic, pushing deltas to Redis"
    )
    _add_model_arguments(train)
    _add_trainer_arguments(train)
    train.add_argument(
        "--idle-timeout", type=float, help="stop after this many seconds without input"
    )
    train.add_argument(
        "--follow", action="store_true", help="keep training after the stream's end markers"
    )
    train.add_argument("--redis", help="Redis URL(s) of the parameter shards (default: embedded)")
    train.add_argument(
        "--nproc",
        type=int,
        help="train one sharded model on N ranks, each reading its own partitions (from a "
        "sharded checkpoint of `embtab train --nproc`, or --state)",
    )
    train.add_argument("--threads", type=int, default=1, help="torch threads per rank (--nproc)")
    _add_kafka_arguments(train)
    train.set_defaults(run=run_train)

    run = actions.add_parser(
        "run", help="produce, join and train at once (embedded services), with live counters"
    )
    _add_replay_arguments(run)
    run.add_argument(
        "--window", type=float, default=60.0, help="event seconds an impression waits for a click"
    )
    run.add_argument(
        "--no-online-features", action="store_true", help="do not write features to Redis"
    )
    _add_join_arguments(run)
    run.add_argument(
        "--join-group", help="the joiner's consumer group (default: <topic prefix>embtab-joiner)"
    )
    _add_model_arguments(run)
    _add_trainer_arguments(run)
    run.add_argument("--redis", help="Redis URL (default: EMBTAB_REDIS or embedded)")
    _add_kafka_arguments(run)
    run.set_defaults(run=run_pipeline_command)


def _add_join_arguments(parser: argparse.ArgumentParser) -> None:
    """How the joiner reads its input topics: formats and derived watermarks."""
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="auto",
        help="message format of both input topics (auto: decided per message)",
    )
    for topic in ("feature-log", "actions"):
        parser.add_argument(
            f"--{topic}-format",
            choices=FORMATS,
            help=f"the {topic} topic's format (default: --format)",
        )
    defaults = JoinerConfig()
    parser.add_argument(
        "--lateness",
        type=float,
        default=defaults.allowed_lateness_s,
        help="event seconds a derived watermark stays behind the latest event",
    )
    parser.add_argument(
        "--idle-after",
        type=float,
        default=defaults.idle_after_s,
        help="wall seconds of silence after which a derived watermark follows the wall clock",
    )
    parser.add_argument(
        "--max-future",
        type=float,
        default=defaults.max_future_s,
        help="seconds ahead of the wall clock beyond which a JSON event is dead-lettered",
    )


def _join_settings(arguments: argparse.Namespace) -> dict[str, Any]:
    """JoinerConfig fields from the join arguments."""
    return {
        "feature_log_format": arguments.feature_log_format or arguments.format,
        "actions_format": arguments.actions_format or arguments.format,
        "allowed_lateness_s": arguments.lateness,
        "idle_after_s": arguments.idle_after,
        "max_future_s": arguments.max_future,
    }


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the trained model comes from: a checkpoint, or a run config for a fresh one."""
    parser.add_argument("--checkpoint", type=Path, help="start from this offline checkpoint")
    parser.add_argument("--config", type=Path, help="YAML or TOML run config of a fresh model")
    parser.add_argument("--model", help=f"fresh model: one of {', '.join(sorted(MODEL_CONFIGS))}")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a run config key of a fresh model, e.g. --set tables.dim=8",
    )
    parser.add_argument(
        "--name",
        help="published model name in Redis (default: the checkpoint's file stem, else "
        "<dataset>-<model>)",
    )
    parser.add_argument(
        "--state",
        type=Path,
        help="trainer state: checkpointed after every sync, resumed from when it exists",
    )


def _add_trainer_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--group", help="Kafka consumer group (default: <topic prefix>embtab-trainer.<model name>)"
    )
    parser.add_argument("--batch-size", type=int, default=4096, help="examples per micro-batch")
    parser.add_argument(
        "--sync-interval", type=float, default=10.0, help="seconds between deltas to Redis"
    )
    parser.add_argument(
        "--dense-every", type=int, default=6, help="dense parameters with every Nth delta"
    )
    parser.add_argument(
        "--encoding", choices=ENCODINGS, default="fp32", help="row encoding of a full publish"
    )


# Kafka security flags, by KafkaSettings field. Passwords have no flag: a command line is
# visible to every local user, so they come from EMBTAB_KAFKA_SASL_PASSWORD and
# EMBTAB_KAFKA_SSL_PASSWORD only.
KAFKA_SECURITY_FLAGS = {
    "security_protocol": "--kafka-security-protocol",
    "sasl_mechanism": "--kafka-sasl-mechanism",
    "sasl_plain_username": "--kafka-sasl-username",
    "ssl_cafile": "--kafka-ssl-cafile",
    "ssl_certfile": "--kafka-ssl-certfile",
    "ssl_keyfile": "--kafka-ssl-keyfile",
}


def _add_kafka_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kafka", help="bootstrap servers (default: EMBTAB_KAFKA or embedded)")
    for name, flag in KAFKA_SECURITY_FLAGS.items():
        parser.add_argument(flag, dest=f"kafka_{name}", help=f"default: ${ENVIRONMENT[name]}")
    parser.add_argument("--topic-prefix", default="", help="prefix of the topic names")
    parser.add_argument(
        "--partitions", type=int, default=4, help="partitions of topics created here"
    )
    parser.add_argument("--json", action="store_true", help="print a JSON result")


@contextlib.contextmanager
def _services(kafka: str | None, redis: str | None, need_redis: bool) -> Iterator[Services]:
    """The given addresses; embedded services (or EMBTAB_*) for the ones not given."""
    with embedded_services(redis=need_redis and not redis, kafka=not kafka) as services:
        services.kafka_bootstrap = kafka or services.kafka_bootstrap
        services.redis_url = redis or services.redis_url
        yield services


def kafka_settings(arguments: argparse.Namespace, bootstrap: str) -> KafkaSettings:
    """EMBTAB_KAFKA* settings, overridden by the security flags given."""
    given = {name: getattr(arguments, f"kafka_{name}", None) for name in KAFKA_SECURITY_FLAGS}
    settings = KafkaSettings.from_env(bootstrap)
    return dataclasses.replace(settings, **{k: v for k, v in given.items() if v is not None})


def _prepare_topics(arguments: argparse.Namespace, services: Services):
    settings = kafka_settings(arguments, services.kafka_bootstrap)
    topics = Topics(prefix=arguments.topic_prefix)
    ensure_topics(settings, stream_topic_partitions(topics, arguments.partitions))
    return settings, topics


def run_produce(arguments: argparse.Namespace) -> int:
    config = ProducerConfig(
        split=arguments.split,
        speedup=arguments.speedup,
        label_delay_s=arguments.label_delay,
        limit=arguments.limit,
        batch_rows=arguments.batch_rows,
        run_id=arguments.run_id,
        format=arguments.format,
    )
    dataset = load_with_progress(arguments.dataset, show_progress=not arguments.json)
    need_redis = not arguments.no_online_features
    with _services(arguments.kafka, arguments.redis, need_redis) as services:
        settings, topics = _prepare_topics(arguments, services)
        online = None
        if need_redis:
            with contextlib.suppress(NoOnlineLayout):
                online = OnlineFeatureStore.from_url(
                    services.redis_url,
                    dataset.schema,
                    namespace=arguments.redis_namespace,
                    preprocessing=dataset.preprocessor(),
                )
        report = ReplayProducer(dataset, settings, topics, config, online=online).run()
    result = {
        **report.to_dict(),
        "kafka": services.kafka_bootstrap,
        "topics": {"feature_log": topics.feature_log, "actions": topics.actions},
        "online_features": online is not None,
    }
    features = (
        f"online features: {report.online_user_writes:,} user and "
        f"{report.online_item_writes:,} item writes"
        if online is not None
        else "no online features"
    )
    summary = (
        f"produced {report.impressions:,} impressions and {report.actions:,} clicks of "
        f"{report.dataset}/{report.split} in {report.messages:,} messages "
        f"({report.bytes / 1e6:.1f} MB) in {report.seconds:.1f} s "
        f"({report.impressions_per_s:,.0f} impressions/s); {features}"
    )
    emit(result, summary, arguments.json)
    return 0


def run_join(arguments: argparse.Namespace) -> int:
    features = preprocessor = None
    if arguments.dataset:
        dataset = load_with_progress(arguments.dataset, show_progress=not arguments.json)
        features = tuple(spec.name for spec in dataset.schema.features)
        preprocessor = dataset.preprocessor()
    config = JoinerConfig(
        **_join_settings(arguments),
        features=features,
        window_s=arguments.window,
        group_id=arguments.group,
        batch_rows=arguments.batch_rows,
        max_pending_rows=arguments.max_pending,
        idle_timeout_s=arguments.idle_timeout,
        stop_at_end=not arguments.follow,
    )
    with _services(arguments.kafka, None, need_redis=False) as services:
        settings, topics = _prepare_topics(arguments, services)
        with stop_on_signals() as stop:
            report = Joiner(settings, topics, config, preprocessor=preprocessor).run(stop)
    result = {
        **report.to_dict(),
        "kafka": services.kafka_bootstrap,
        "examples_topic": topics.examples,
    }
    summary = (
        f"joined {report.examples:,} examples ({report.positives:,} positive, "
        f"{report.negatives:,} negative) in {report.seconds:.1f} s; late clicks "
        f"{report.late_clicks:,}, orphan clicks {report.orphan_clicks:,}, duplicates "
        f"{report.duplicate_impressions + report.duplicate_actions:,}, evicted early "
        f"{report.evicted_impressions:,}, dead-lettered {report.dlq_messages:,}"
    )
    emit(result, summary, arguments.json)
    return 0


def run_train(arguments: argparse.Namespace) -> int:
    if arguments.nproc is not None:
        return run_sharded_train(arguments)
    with _services(arguments.kafka, arguments.redis, need_redis=True) as services:
        settings, topics = _prepare_topics(arguments, services)
        trainer = _build_trainer(arguments, services, settings, topics, dataset=None)
        with (
            stop_on_signals() as stop,
            _status_line(lambda: _trainer_line(trainer), live=not arguments.json) as refresh,
        ):
            StreamPipeline(trainer).run(stop, on_poll=refresh)
    report = trainer.report
    result = {
        **report.to_dict(),
        "kafka": services.kafka_bootstrap,
        "redis": redact_url(services.redis_url),
        "examples_topic": topics.examples,
    }
    emit(result, _trainer_summary(report, topics.examples), arguments.json)
    return 0


def run_pipeline_command(arguments: argparse.Namespace) -> int:
    result, summary = run_pipeline(arguments)
    emit(result, summary, arguments.json)
    return 0


def run_pipeline(arguments: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """Replay, join and train together until the replay's end has been trained on; returns
    the JSON result and a one-line summary (what `embtab stream run` prints)."""
    dataset = load_with_progress(arguments.dataset, show_progress=not arguments.json)
    features = tuple(spec.name for spec in dataset.schema.features)
    with _services(arguments.kafka, arguments.redis, need_redis=True) as services:
        settings, topics = _prepare_topics(arguments, services)
        online = None
        if not arguments.no_online_features:
            with contextlib.suppress(NoOnlineLayout):
                online = OnlineFeatureStore.from_url(
                    services.redis_url, dataset.schema, preprocessing=dataset.preprocessor()
                )
        producer = ReplayProducer(
            dataset,
            settings,
            topics,
            ProducerConfig(
                split=arguments.split,
                speedup=arguments.speedup,
                label_delay_s=arguments.label_delay,
                limit=arguments.limit,
            ),
            online=online,
        )
        joiner = Joiner(
            settings,
            topics,
            JoinerConfig(
                features=features,
                window_s=arguments.window,
                group_id=arguments.join_group,
                **_join_settings(arguments),
            ),
            preprocessor=dataset.preprocessor(),
        )
        trainer = _build_trainer(arguments, services, settings, topics, dataset=dataset)

        def describe() -> str:
            return (
                f"produced {producer.report.impressions:,} | joined "
                f"{joiner.report.examples:,} | {_trainer_line(trainer)}"
            )

        with (
            stop_on_signals() as stop,
            _status_line(describe, live=not arguments.json) as refresh,
        ):
            StreamPipeline(trainer, joiner, producer).run(stop, on_poll=refresh)
    result = {
        "producer": producer.report.to_dict(),
        "joiner": joiner.report.to_dict(),
        "trainer": trainer.report.to_dict(),
        "kafka": services.kafka_bootstrap,
        "redis": redact_url(services.redis_url),
        "topic_prefix": topics.prefix,
    }
    summary = (
        f"replayed {producer.report.impressions:,} events of {dataset.name}/{arguments.split}, "
        f"joined {joiner.report.examples:,} examples; "
        f"{_trainer_summary(trainer.report, topics.examples)}"
    )
    return result, summary


def _build_trainer(
    arguments: argparse.Namespace,
    services: Services,
    settings: KafkaSettings,
    topics: Topics,
    dataset: Dataset | None,
) -> Trainer:
    """The trainer the arguments describe: its model (resumed state, checkpoint, or a fresh one
    from a run config), the published name, and the Redis shards it pushes to."""
    if arguments.checkpoint is not None and (arguments.config or arguments.model or arguments.set):
        raise ValueError(
            "give either --checkpoint or a fresh model's --config/--model/--set, not both"
        )
    fresh = None
    if arguments.checkpoint is None:
        overrides = [parse_override(text) for text in arguments.set]
        if arguments.model:
            overrides.append(("model.name", arguments.model))
        if dataset is not None:
            overrides.append(("dataset", dataset.name))
        fresh = load_run_config(arguments.config, overrides)
    default_name = (
        arguments.checkpoint.stem
        if arguments.checkpoint is not None
        else f"{fresh.dataset}-{fresh.model.name}"
    )
    name = check_name("model", arguments.name or default_name)
    start = StartingPoint.resume(arguments.state, name) if arguments.state else None
    train = TrainConfig()
    if start is None and arguments.checkpoint is not None:
        start = StartingPoint.from_checkpoint(arguments.checkpoint)
        if "run" in start.origin_manifest:
            train = train_config_of_run(start.origin_manifest["run"])
    elif start is None:
        dataset = dataset or load_with_progress(fresh.dataset, show_progress=not arguments.json)
        spec = plan_model(fresh, dataset.schema, dataset.preprocessor())
        seed_everything(fresh.train.seed)
        start = StartingPoint(
            build_model(spec, graphhash_mappings(spec, dataset, fresh.train.seed))
        )
        train = fresh.train
    # Bounded waits, no client retries: the sync retries a failed push itself, and a full
    # publish of a large model needs more than the default second per pipeline.
    nodes = RedisNodes(RedisConfig.parse(services.redis_url, socket_timeout_s=5.0, retries=0))
    config = _trainer_config(arguments, train)
    return Trainer(settings, topics, start, ParamPublisher(nodes, name), config)


def _trainer_config(arguments: argparse.Namespace, train: TrainConfig) -> TrainerConfig:
    return TrainerConfig(
        group_id=arguments.group,
        batch_size=arguments.batch_size,
        stop_at_end=not getattr(arguments, "follow", False),
        idle_timeout_s=getattr(arguments, "idle_timeout", None),
        state_path=None if arguments.state is None else str(arguments.state),
        train=train,
        sync=SyncConfig(
            interval_s=arguments.sync_interval,
            dense_every=arguments.dense_every,
            encoding=arguments.encoding,
        ),
    )


def run_sharded_train(arguments: argparse.Namespace) -> int:
    """`embtab stream train --nproc N`: the sharded streaming trainer on N local ranks (or, under
    torchrun, this process's rank)."""
    if arguments.config or arguments.model or arguments.set:
        raise ValueError(
            "--nproc continues a sharded checkpoint (embtab train --nproc N --checkpoint DIR) "
            "or its own --state; a fresh model's --config/--model/--set are not accepted"
        )
    source = arguments.checkpoint or arguments.state
    if source is None:
        raise ValueError("--nproc needs --checkpoint (a sharded checkpoint) or --state")
    name = check_name("model", arguments.name or source.stem)
    train = TrainConfig()
    if arguments.checkpoint is not None:
        manifest = ShardedCheckpoint(arguments.checkpoint).manifest
        if "run" in manifest:
            train = train_config_of_run(manifest["run"])
    with contextlib.ExitStack() as stack:
        staging = (
            arguments.state.with_name(arguments.state.name + ".staging")
            if arguments.state is not None
            else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="embtab-staging-")))
        )
        services = stack.enter_context(_services(arguments.kafka, arguments.redis, True))
        settings, topics = _prepare_topics(arguments, services)
        job = ShardedStreamJob(
            kafka=settings,
            topics=topics,
            redis=services.redis_url,
            redis_model=name,
            trainer=_trainer_config(arguments, train),
            distributed=DistributedConfig(world_size=arguments.nproc, threads=arguments.threads),
            staging=str(staging),
            checkpoint=None if arguments.checkpoint is None else str(arguments.checkpoint),
        )
        # The ranks stop themselves on Ctrl-C (their process group gets it too).
        stack.enter_context(stop_on_signals((signal.SIGINT,)))
        reports = train_stream_distributed(job)
    examples = sum(report["examples"] for report in reports)
    last = reports[0]
    result = {
        "ranks": reports,
        "examples": examples,
        "version": last["version"],
        "delta": last["delta"],
        "redis_model": name,
        "kafka": services.kafka_bootstrap,
        "redis": redact_url(services.redis_url),
        "examples_topic": topics.examples,
    }
    partitions = "; ".join(f"rank {r['rank']}: {r['partitions']}" for r in reports)
    summary = (
        f"trained {examples:,} examples of {topics.examples} on {len(reports)} rank(s) "
        f"(partitions {partitions}); {name} v{last['version']} at delta {last['delta']}"
    )
    emit(result, summary, arguments.json)
    return 0


@contextlib.contextmanager
def _status_line(describe: Callable[[], str], *, live: bool) -> Iterator[Callable[[], None]]:
    """A one-line status on stderr (nothing when not `live`); the yielded function refreshes it."""
    with tqdm(bar_format="{desc}", file=sys.stderr, disable=not live, leave=False) as line:
        yield lambda: line.set_description_str(describe(), refresh=True)


def _trainer_line(trainer: Trainer) -> str:
    status = trainer.status()
    sync = "no sync yet"
    if status.version is not None:
        age = "" if status.last_sync_age_s is None else f" {status.last_sync_age_s:.1f}s ago"
        sync = f"v{status.version}.{status.delta}{age}"
        if status.sync_failures:
            sync += f" ({status.sync_failures} failed tries)"
    auc = "-" if status.last_window_auc is None else f"{status.last_window_auc:.4f}"
    lag = "-" if status.lag is None else f"{status.lag:,}"
    return (
        f"trained {status.examples:,} ({status.examples_per_s:,.0f}/s) | lag {lag} msgs | "
        f"sync {sync} | window AUC {auc} | DLQ {status.dead_letters}"
    )


def _trainer_summary(report, topic: str) -> str:
    auc = "-" if report.last_window_auc is None else f"{report.last_window_auc:.4f}"
    return (
        f"trained {report.examples:,} examples from {topic} in {report.active_seconds:.1f} s "
        f"({report.examples_per_s:,.0f}/s) into {report.redis_model!r} v{report.version} "
        f"(delta {report.delta}, {report.deltas} deltas, {report.full_publishes} full); "
        f"last window AUC {auc}, dead-lettered {report.dlq_messages}, skipped "
        f"{report.skipped_batches}"
    )
