"""Keeps a scorer on the live version: pub/sub for speed, polling for what pub/sub misses.

One background thread subscribes to the model's event channel and, on every message and at least
every `poll_s`, asks the scorer to catch up (new version, deltas, dense revision). Pub/sub is
fire-and-forget (a server that was disconnected misses messages), so the poll is what makes the
server correct; the message only makes it fast. The same loop is the Redis health probe: a
failed refresh marks Redis down, the next successful one marks it up again.
"""

from __future__ import annotations

import contextlib
import logging
import threading

import redis

from serving.errors import RedisUnavailableError, ServingError
from serving.keys import ModelKeys
from serving.redis_nodes import RedisNodes
from serving.scorer import Scorer

log = logging.getLogger("embtab.serving")


class VersionWatcher:
    def __init__(
        self, scorer: Scorer, nodes: RedisNodes, poll_s: float = 1.0, retry_s: float = 0.5
    ) -> None:
        self.scorer = scorer
        self.nodes = nodes
        self.poll_s = poll_s
        self.retry_s = retry_s
        self.channel = ModelKeys(scorer.config.model).events
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="embtab-watcher", daemon=True)
        self.last_error = ""

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout=timeout_s)

    def _run(self) -> None:
        pubsub = None
        while not self._stop.is_set():
            try:
                if pubsub is None:
                    pubsub = self.nodes.meta.pubsub(ignore_subscribe_messages=True)
                    pubsub.subscribe(self.channel)
                self.scorer.refresh()
                self.scorer.health.succeeded()
                pubsub.get_message(timeout=self.poll_s)
            except (RedisUnavailableError, redis.RedisError, OSError) as error:
                self.last_error = str(error)
                self.scorer.health.failed(error)
                pubsub = _close(pubsub)
                self._stop.wait(self.retry_s)
            except ServingError as error:
                # Redis answers but what it holds is not servable (a version without its dense
                # blob yet, a manifest this build cannot read): keep the current snapshot.
                if str(error) != self.last_error:
                    log.warning("cannot load %s: %s", self.scorer.config.model, error)
                self.last_error = str(error)
                self._stop.wait(self.poll_s)
        _close(pubsub)


def _close(pubsub) -> None:
    """Close a pub/sub connection that may already be broken; always returns None."""
    if pubsub is not None:
        with contextlib.suppress(redis.RedisError, OSError):
            pubsub.close()
