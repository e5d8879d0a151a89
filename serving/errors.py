"""Typed errors of serving: each says what was wrong and what is accepted.

`RequestError` and its subclasses are the client's fault and map to a 4xx status; `StoreError`
and its subclasses are about Redis or what is published there. Bad input is also a
`ValueError` (a request, a name, rows or a publish that cannot be taken as given); a Redis that
is down or refuses the credentials is not: it is a failure of the service, not of the input.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import redis
from redis.exceptions import NoPermissionError

# What a Redis client raises when the server cannot be reached or does not answer in time.
REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError, OSError)


class ServingError(Exception):
    """Base class for every error raised by serving."""


class RequestError(ServingError, ValueError):
    """A scoring request the service cannot answer as sent; `status` is its HTTP status."""

    status = 400

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field


class FeatureValueError(RequestError):
    """A feature value the model does not accept (unknown feature, id out of range, bad type)."""

    status = 400


class TooManyCandidatesError(RequestError):
    """More candidates than one request may carry."""

    status = 413


class BodyTooLargeError(RequestError):
    """A request body larger than the service accepts."""

    status = 413


class UnknownModelError(RequestError):
    """A request for a model this service does not serve."""

    status = 404


class StoreError(ServingError):
    """Redis or the parameter layout in it is not what the caller needs."""


class KeyNameError(StoreError, ValueError):
    """A model or table name that cannot be part of a Redis key."""


class EncodingError(StoreError, ValueError):
    """Rows that cannot be encoded as asked, or stored bytes that do not decode."""


class VersionNotFoundError(StoreError, LookupError):
    """No live version of a model, or a version whose namespace is gone."""


class PublishError(StoreError, ValueError):
    """A publish that cannot go on (bad tables, wrong shapes, a version that is not live)."""


class RedisAuthError(StoreError):
    """Redis refused the credentials given in the URL (or asked for some)."""


class RedisUnavailableError(StoreError):
    """Redis did not answer in time; the caller degrades (cache and default rows)."""


@contextlib.contextmanager
def redis_call(what: str) -> Iterator[None]:
    """Turn Redis connection failures into RedisUnavailableError naming what was being done."""
    try:
        yield
    except redis.AuthenticationError as error:
        raise RedisAuthError(f"{what}: Redis refused the credentials ({error})") from error
    except NoPermissionError as error:  # the ACL user may not run this command or use this key
        raise RedisAuthError(
            f"{what}: the Redis ACL user lacks a permission ({error}); it needs every non-admin "
            "command on the keys embtab:*"
        ) from error
    except REDIS_ERRORS as error:
        raise RedisUnavailableError(f"{what}: Redis did not answer ({error})") from error
