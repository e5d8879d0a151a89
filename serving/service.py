"""A scoring service's parts wired together: Redis nodes, scorer, watcher, micro-batcher, metrics.

The HTTP layer (`serving.app`) only parses, submits and answers; everything with state lives
here and is started and stopped with the app.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
from dataclasses import dataclass, field

import redis
import torch

from feature_store.artifact import Preprocessor
from feature_store.online import NoOnlineLayout, OnlineFeatureStore, OnlineLayout
from feature_store.schema import Schema
from serving.batcher import MicroBatcher
from serving.errors import ServingError
from serving.metrics import ServiceMetrics
from serving.parsing import BodyParser, NoVersionError
from serving.reader import ParamReader
from serving.redis_nodes import RedisConfig, RedisNodes
from serving.request import RequestColumns, parse_request
from serving.scorer import NotReadyError, RequestScores, Scorer, ScorerConfig
from serving.watcher import VersionWatcher

log = logging.getLogger("embtab.serving")


@dataclass(frozen=True)
class ServeConfig:
    """Everything `embtab serve` takes.

    `features_redis`: URL of the online feature store; None uses the first parameter URL, ""
    disables online features. Redis timeouts are short on purpose: a request never waits on a
    Redis that does not answer for more than `redis.socket_timeout_s`, once (then the breaker
    keeps requests off Redis until the watcher sees it answer again). Limits: a request
    carries at most `max_body_bytes` and `max_candidates` (413) and is answered within
    `request_timeout_s` (else 503). Bodies over `offload_body_bytes` are parsed in a worker
    process (serving.parsing), so that the event loop serves other clients meanwhile. A
    connection must send each request's headers within
    `header_timeout_s` (else it is closed); at most `max_connections` are open at once (fewer
    if the descriptor limit is lower).
    """

    model: str
    redis: RedisConfig
    features_redis: str | None = field(default=None, repr=False)  # may carry credentials
    host: str = "127.0.0.1"
    port: int = 8000
    max_candidates: int = 1000
    max_body_bytes: int = 8 * 2**20
    offload_body_bytes: int = 256 * 2**10
    request_timeout_s: float = 5.0
    header_timeout_s: float = 10.0
    max_connections: int = 1000
    max_wait_ms: float = 2.0
    max_batch_rows: int = 8192
    cache_bytes: int = 256 * 2**20
    poll_s: float = 1.0
    torch_threads: int = 1

    def __post_init__(self) -> None:
        if self.host not in ("127.0.0.1", "localhost", "::1"):
            raise ServingError(
                f"the service listens on loopback only; got host {self.host!r}, accepted: "
                "127.0.0.1, localhost, ::1"
            )
        if not 0 <= self.port <= 65535:
            raise ServingError(f"port must be in [0, 65535], got {self.port}")
        if self.torch_threads < 1 or self.poll_s <= 0 or self.max_body_bytes < 1:
            raise ServingError("torch_threads >= 1, poll_s > 0 and max_body_bytes >= 1 needed")
        if self.offload_body_bytes < 0:
            raise ServingError(
                f"offload_body_bytes must be >= 0 (0: every body is parsed in the worker), got "
                f"{self.offload_body_bytes}"
            )
        if not self.header_timeout_s > 0 or self.max_connections < 1:
            raise ServingError(
                f"header_timeout_s must be > 0 and max_connections >= 1, got "
                f"{self.header_timeout_s} and {self.max_connections}"
            )
        if not self.request_timeout_s > 0 or self.max_candidates < 1:
            raise ServingError(
                f"request_timeout_s must be > 0 and max_candidates >= 1, got "
                f"{self.request_timeout_s} and {self.max_candidates}"
            )


def serving_redis(url: str | list[str], cluster: bool = False) -> RedisConfig:
    """Redis settings for the serving path: 100 ms timeouts, no retries."""
    return RedisConfig.parse(
        url, cluster=cluster, socket_timeout_s=0.1, connect_timeout_s=0.1, retries=0
    )


class ScoringService:
    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.nodes = RedisNodes(config.redis)
        features_url = (
            config.redis.urls[0] if config.features_redis is None else config.features_redis
        )
        self._features_client = None
        if features_url:
            options = dataclasses.replace(config.redis, urls=(features_url,), cluster=False)
            self._features_client = RedisNodes(options).meta
        self.scorer = Scorer(
            ParamReader(self.nodes, config.model),
            ScorerConfig(
                model=config.model,
                max_candidates=config.max_candidates,
                cache_bytes=config.cache_bytes,
            ),
            online=self._online_store if self._features_client is not None else None,
        )
        self.watcher = VersionWatcher(self.scorer, self.nodes, poll_s=config.poll_s)
        self.batcher: MicroBatcher[RequestColumns] = MicroBatcher(
            self._score_batch,
            lambda job: job.num_candidates,
            max_wait_s=config.max_wait_ms / 1000,
            max_rows=config.max_batch_rows,
        )
        self.metrics = ServiceMetrics(self.scorer)
        self.parser = BodyParser(config.model, config.max_candidates)

    def _online_store(
        self, schema: Schema, preprocessing: Preprocessor | None
    ) -> OnlineFeatureStore | None:
        """The online store restricted to the model's features, reading raw values of the
        version's artifact; None if its data set has none."""
        try:
            layout = OnlineLayout.for_schema(schema, preprocessing)
        except NoOnlineLayout:
            return None
        names = {spec.name for spec in schema.features}
        layout = dataclasses.replace(
            layout,
            user_features=tuple(name for name in layout.user_features if name in names),
            item_features=tuple(name for name in layout.item_features if name in names),
            sequence_feature=layout.sequence_feature if layout.sequence_feature in names else None,
        )
        return OnlineFeatureStore(
            self._features_client, schema, layout, preprocessing=preprocessing
        )

    def _score_batch(self, jobs: list[RequestColumns]) -> list[RequestScores]:
        self.metrics.batch_requests.observe(len(jobs))
        return self.scorer.score(jobs).split()

    async def prepare(self, body: bytes) -> RequestColumns:
        """A body's columns; raises RequestError (4xx) or NotReadyError. A large body is parsed
        in the worker process: on the event loop it would stall every other client."""
        if len(body) <= self.config.offload_body_bytes:
            return self.scorer.prepare(parse_request(body, self.config.max_candidates))
        try:
            preparation = self.scorer.preparation()
        except NotReadyError:
            preparation = None  # the worker still refuses an invalid body as the loop would
        try:
            return await self.parser.prepare(body, preparation, self.scorer.unknown_ids)
        except NoVersionError:
            self.scorer.preparation()  # raises NotReadyError, unless a version just came
            return await self.prepare(body)

    async def start(self) -> None:
        """Load the live version if Redis has one, then start the watcher, the batcher (on
        the running event loop) and the body parser's worker process."""
        await self.parser.start()
        torch.set_num_threads(self.config.torch_threads)
        log.info(
            "serving model=%s redis=%s", self.config.model, ",".join(self.config.redis.redacted())
        )
        try:
            self.scorer.refresh()
        except (ServingError, redis.RedisError) as error:  # not published, Redis down: retried
            log.warning("no version loaded at start: %s", error)
        # Everything alive now (modules, the model) lives as long as the process: keep it out
        # of the cyclic collector, whose full passes over it took 0.5-0.7 s on a 2-core machine
        # and landed on whichever request was being scored.
        gc.collect()
        gc.freeze()
        self.watcher.start()
        self.batcher.start()
        await self.parser.wait_started()

    async def stop(self) -> None:
        self.watcher.stop()
        await self.batcher.stop()
        await self.parser.stop()
        gc.unfreeze()  # let interpreter shutdown collect what start() froze
        self.nodes.close()
        if self._features_client is not None:
            self._features_client.close()
