"""The stream wired once: producer -> joiner -> trainer (and the trainer's delta sync).

`embtab stream run` and the demo run the three stages in one process, each on a thread of its
own, and `embtab stream train` runs the trainer alone. They must agree on the order (the trainer
attaches to its published model and the consumer groups settle before the first event is
produced) and on failure (the first stage that fails stops the others, and its error is the one
raised), so all of them go through `StreamPipeline`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from online_training.joiner import Joiner
from online_training.joiner_report import JoinerReport
from online_training.producer import ProducerReport, ReplayProducer
from online_training.trainer import Trainer
from online_training.trainer_report import TrainerReport

POLL_S = 0.5


class PipelineError(RuntimeError):
    """The stages could not be run together (the trainer never attached to its model)."""


@dataclass
class PipelineReports:
    """What each stage reported; a stage that did not finish has no report."""

    trainer: TrainerReport | None = None
    joiner: JoinerReport | None = None
    producer: ProducerReport | None = None
    errors: list[BaseException] = field(default_factory=list)


@dataclass(frozen=True)
class PipelineConfig:
    """`attach_timeout_s`: how long the trainer may take to attach to its published model before
    events are produced; `settle_s`: then how long the consumer groups get to be assigned their
    partitions (the embedded broker takes a few seconds)."""

    attach_timeout_s: float = 120.0
    settle_s: float = 0.0


class StreamPipeline:
    """Runs the trainer and the joiner, then the producer once the trainer is attached, until
    the trainer and the joiner have reached the end of the stream, or `stop` is set, or a stage
    fails. Without a joiner it runs the trainer alone (on an examples topic others fill)."""

    def __init__(
        self,
        trainer: Trainer,
        joiner: Joiner | None = None,
        producer: ReplayProducer | None = None,
        config: PipelineConfig | None = None,
    ) -> None:
        self.trainer = trainer
        self.joiner = joiner
        self.producer = producer
        self.config = config or PipelineConfig()
        self.reports = PipelineReports()

    def run(
        self, stop: threading.Event, on_poll: Callable[[], None] | None = None
    ) -> PipelineReports:
        """Run to the end; `on_poll` is called every half second meanwhile (a status line).
        Raises the first stage's error after the trainer and the joiner have stopped.

        The producer is not waited for once `stop` is set: a replay has no stop of its own, and
        what it still sends after the consumers stopped is read by the next run."""
        consumers = [self._start("trainer", lambda: self.trainer.run(stop), stop)]
        if self.joiner is not None:
            consumers.append(self._start("joiner", lambda: self.joiner.run(stop), stop))
        producer = None
        try:
            if self.producer is not None:
                self._wait_for_attach(stop, on_poll)
                if not self._waited(stop, self.config.settle_s, on_poll):
                    producer = self._start("producer", self.producer.run, stop)
            while any(thread.is_alive() for thread in consumers):
                if on_poll is not None:
                    on_poll()
                for thread in consumers:
                    thread.join(timeout=POLL_S / len(consumers))
        except BaseException:  # the attach timeout, Ctrl-C: every stage stops before it is raised
            stop.set()
            raise
        finally:
            for thread in consumers:
                thread.join()
            if producer is not None and not stop.is_set():
                producer.join()
        if self.reports.errors:
            raise self.reports.errors[0]
        return self.reports

    def _start(
        self, stage: str, task: Callable[[], Any], stop: threading.Event
    ) -> threading.Thread:
        def run() -> None:
            try:
                setattr(self.reports, stage, task())
            except BaseException as error:  # raised on the calling thread by `run`
                self.reports.errors.append(error)
                stop.set()

        thread = threading.Thread(target=run, name=f"embtab-{stage}", daemon=True)
        thread.start()
        return thread

    def _wait_for_attach(self, stop: threading.Event, on_poll: Callable[[], None] | None) -> None:
        deadline = time.monotonic() + self.config.attach_timeout_s
        while self.trainer.status().version is None and not stop.is_set():
            if time.monotonic() > deadline:
                raise PipelineError(
                    f"the online trainer did not attach to its published model within "
                    f"{self.config.attach_timeout_s:g} s; is Redis reachable and the model "
                    "published?"
                )
            self._waited(stop, POLL_S, on_poll)

    @staticmethod
    def _waited(stop: threading.Event, seconds: float, on_poll: Callable[[], None] | None) -> bool:
        """Wait `seconds` (calling `on_poll`); True if `stop` was set meanwhile."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if stop.wait(min(left, POLL_S)):
                return True
            if on_poll is not None:
                on_poll()
        return stop.is_set()
