"""Faults: a joiner killed mid-stream and restarted; the broker frozen for a few seconds.

Both must end with every impression joined at least once, with the data set's label; copies
of an example are allowed (at-least-once) and counted.
"""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest
from kafka import TopicPartition

from online_training.joiner import Joiner
from online_training.joiner_config import JoinerConfig
from online_training.kafka import make_consumer
from online_training.producer import ProducerConfig, ReplayProducer
from tests.online_training.conftest import PARTITIONS, SLICE, event_index, read_examples

# The first SLICE test events span 68,230 event-seconds: this paces them over about 3 s.
SPEEDUP = 20_000


def _check_no_loss(kafka, topics, slice_labels) -> int:
    """Every impression has an example with its data set label; returns how many are copies."""
    labels, _ = read_examples(kafka, topics)
    assert sorted(event_index(request_id) for request_id in labels) == list(range(SLICE))
    for request_id, seen in labels.items():
        assert set(seen) == {slice_labels[event_index(request_id)]}, request_id
    return sum(len(seen) - 1 for seen in labels.values())


def _replay_in_background(movielens, kafka, topics) -> tuple[threading.Thread, list]:
    reports: list = []
    config = ProducerConfig(limit=SLICE, speedup=SPEEDUP, label_delay_s=30, batch_rows=64)
    thread = threading.Thread(
        target=lambda: reports.append(ReplayProducer(movielens, kafka, topics, config).run())
    )
    thread.start()
    return thread, reports


def _examples_written(kafka, topics) -> int:
    """Messages in the examples topic so far."""
    consumer = make_consumer(kafka, None)
    try:
        partitions = [TopicPartition(topics.examples, p) for p in range(PARTITIONS)]
        return sum(consumer.end_offsets(partitions).values())
    finally:
        consumer.close()


# A joiner in its own process, so that it can be killed; it logs its partition assignments.
JOINER_PROCESS = """
import json, logging, sys
from online_training.joiner import Joiner
from online_training.joiner_config import JoinerConfig
from online_training.kafka import KafkaSettings, Topics
logging.basicConfig(stream=sys.stderr, level=logging.WARNING)
logging.getLogger("online_training").setLevel(logging.INFO)
kafka, prefix, group = sys.argv[1:4]
config = JoinerConfig(group_id=group, batch_rows=64)
report = Joiner(KafkaSettings(kafka), Topics(prefix=prefix), config).run()
print(json.dumps(report.to_dict()))
"""


def _start_joiner(kafka, topics, group: str) -> tuple[subprocess.Popen, queue.SimpleQueue]:
    """The joiner process, and the lines of its log as they come."""
    command = [sys.executable, "-c", JOINER_PROCESS, kafka.bootstrap_servers, topics.prefix, group]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.SimpleQueue = queue.SimpleQueue()
    threading.Thread(
        target=lambda: [lines.put(line) for line in process.stderr], daemon=True
    ).start()
    return process, lines


def _wait_for_assignment(lines: queue.SimpleQueue, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while "partitions assigned" not in lines.get(timeout=max(0.1, deadline - time.monotonic())):
        assert time.monotonic() < deadline, "the joiner never got its partitions"


def test_a_killed_joiner_restarts_from_its_commits_without_losing_examples(
    kafka, topics, movielens, slice_labels
):
    group = f"joiner-{uuid.uuid4().hex[:8]}"
    first, log = _start_joiner(kafka, topics, group)
    try:
        _wait_for_assignment(log)
        producer, reports = _replay_in_background(movielens, kafka, topics)
        deadline = time.monotonic() + 30
        while _examples_written(kafka, topics) == 0:
            assert time.monotonic() < deadline and first.poll() is None, "no examples came"
            time.sleep(0.05)
        assert producer.is_alive(), "the joiner must be killed while the stream still runs"
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
        written_before = _examples_written(kafka, topics)
        second, _ = _start_joiner(kafka, topics, group)
        stdout, _ = second.communicate(timeout=60)
    finally:
        for process in (first, second) if "second" in locals() else (first,):
            if process.poll() is None:
                process.kill()
        producer.join(timeout=60)
    assert second.returncode == 0
    assert reports and reports[0].impressions == SLICE
    report = json.loads(stdout)
    assert report["examples"] > 0 and sorted(report["ended_partitions"]) == [0, 1, 2, 3]
    assert written_before > 0
    copies = _check_no_loss(kafka, topics, slice_labels)
    print(f"restart: {copies} of {SLICE} examples came out twice")


def test_producer_and_joiner_ride_out_a_frozen_broker(
    kafka_service, kafka, topics, movielens, slice_labels
):
    broker = kafka_service.kafka
    if broker is None:
        pytest.skip("the broker is not ours to freeze (EMBTAB_KAFKA is set)")
    joiner = Joiner(kafka, topics, JoinerConfig(group_id=f"joiner-{uuid.uuid4().hex[:8]}"))
    joined = threading.Thread(target=joiner.run)
    joined.start()
    producer, reports = _replay_in_background(movielens, kafka, topics)
    try:
        time.sleep(1.0)
        broker.pause()
        time.sleep(5.0)
    finally:
        broker.resume()
    producer.join(timeout=60)
    joined.join(timeout=60)
    assert not producer.is_alive() and not joined.is_alive()
    assert reports and reports[0].impressions == SLICE
    assert joiner.report.examples >= SLICE
    copies = _check_no_loss(kafka, topics, slice_labels)
    print(f"frozen broker: {copies} copies, {joiner.report.rebalances} rebalances")
