"""StreamPipeline: the stages run together and a failing stage stops the others, whose error
is raised once every consumer stage has stopped."""

from __future__ import annotations

import threading
import uuid

from online_training.joiner import Joiner
from online_training.joiner_config import JoinerConfig
from online_training.kafka import KafkaConfigError, Topics, ensure_topics
from online_training.pipeline import StreamPipeline
from online_training.trainer import Trainer
from online_training.trainer_config import TrainerConfig
from online_training.trainer_state import StartingPoint
from tests.online_training.example_stream import publisher_for, small_model, unique_model_name


def test_a_joiner_that_cannot_start_stops_the_trainer_and_its_error_is_raised(
    kafka, movielens, redis_service
):
    topics = Topics(prefix=f"test-{uuid.uuid4().hex[:10]}.")
    ensure_topics(kafka, {topics.feature_log: 4, topics.actions: 2, topics.examples: 4})
    ensure_topics(kafka, {Topics.dlq(t): 1 for t in (topics.feature_log, topics.actions)})
    trainer = Trainer(
        kafka,
        topics,
        StartingPoint(small_model(movielens)),
        publisher_for(redis_service.redis_url, unique_model_name()),
        TrainerConfig(group_id=f"t-{uuid.uuid4().hex[:8]}"),
    )
    joiner = Joiner(kafka, topics, JoinerConfig(group_id=f"j-{uuid.uuid4().hex[:8]}"))
    stop = threading.Event()
    raised: list[BaseException] = []

    def run() -> None:
        try:
            StreamPipeline(trainer, joiner).run(stop)
        except BaseException as error:
            raised.append(error)

    running = threading.Thread(target=run, daemon=True)
    running.start()
    running.join(timeout=60)
    stopped_by_itself = not running.is_alive()
    stop.set()  # a pipeline that did not stop by itself is stopped, so no thread is left behind
    running.join(timeout=30)
    assert stopped_by_itself, "the joiner's failure did not stop the trainer"
    assert len(raised) == 1 and isinstance(raised[0], KafkaConfigError), raised
    assert "same number of partitions" in str(raised[0])
    assert trainer.report.seconds > 0, "the trainer was stopped and returned its report"
