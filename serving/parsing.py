"""Request bodies -> columns, and a worker process that does it for large bodies.

pydantic, `json.loads` and `pydantic_core.from_json` hold the GIL for a whole parse (127-460 ms
for an 8 MB body), so a thread would stall the event loop as much. Bodies over
`ServeConfig.offload_body_bytes` go to one worker process instead, started with the service
and kept: it runs the same `prepare_columns` (parse, raw-value encoding, the model's checks)
with the served version's rules and preprocessing artifact, and sends back the columns or the
error, so that a body gets the same answer whichever way it went. Over the pipe go bytes only:
frames of a JSON header and binary parts (the body, artifact files, safetensors columns);
nothing is pickled.

    python -m serving.parsing     the worker: frames in on stdin, frames out on stdout
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import struct
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
import safetensors.numpy

from feature_store.artifact import Preprocessor
from feature_store.schema import FeatureSpec
from serving.errors import RequestError, ServingError, UnknownModelError
from serving.jagged import Jagged
from serving.raw_values import RawValueEncoder
from serving.request import (
    FeatureRule,
    RequestColumns,
    RequestValues,
    parse_request,
    request_columns,
)

log = logging.getLogger("embtab.serving")

FRAME = struct.Struct(">IQ")  # header length, payload length


@dataclass(frozen=True)
class Preparation:
    """What checking a request against the served version takes (a Snapshot's part of it)."""

    rules: dict[str, FeatureRule]
    user_column: str
    item_column: str
    encoder: RawValueEncoder | None = None


class NoVersionError(ServingError):
    """No version is loaded: the request is valid as far as it can be checked without one."""


class ParserGoneError(ServingError):
    """The worker process stopped before it answered (it is started again for the next body)."""


def check_model(request: RequestValues, model: str) -> None:
    if request.model is not None and request.model != model:
        raise UnknownModelError(
            "model", f"unknown model {request.model!r}; this service serves {model!r}"
        )


def prepare_columns(request: RequestValues, preparation: Preparation) -> RequestColumns:
    """A parsed request as columns: raw values encoded (with an artifact), then checked."""
    if preparation.encoder is not None:
        request = preparation.encoder.encode(request)
    return request_columns(
        request, preparation.rules, preparation.user_column, preparation.item_column
    )


# -- frames -----------------------------------------------------------------------------------


def frame(header: dict, parts: Sequence[bytes] = ()) -> bytes:
    encoded = json.dumps({**header, "parts": [len(part) for part in parts]}).encode()
    payload = b"".join(parts)
    return FRAME.pack(len(encoded), len(payload)) + encoded + payload


def split_parts(header: dict, payload: bytes) -> list[bytes]:
    parts, start = [], 0
    for size in header["parts"]:
        parts.append(payload[start : start + size])
        start += size
    return parts


def columns_to_bytes(columns: RequestColumns) -> bytes:
    arrays: dict[str, np.ndarray] = {"item_ids": columns.item_ids}
    if columns.item_known is not None:
        arrays["item_known"] = columns.item_known
    for index, (jagged, mask) in enumerate(columns.sparse.values()):
        arrays[f"s{index}.values"] = jagged.values
        arrays[f"s{index}.lengths"] = jagged.lengths
        arrays[f"s{index}.mask"] = mask
    for index, (values, mask) in enumerate(columns.dense.values()):
        arrays[f"d{index}.values"] = values
        arrays[f"d{index}.mask"] = mask
    described = {
        "user_id": columns.user_id,
        "num_candidates": columns.num_candidates,
        "user_known": columns.user_known,
        "raw_user_id": columns.raw_user_id,
        "raw_item_ids": columns.raw_item_ids,
        "sparse": list(columns.sparse),
        "dense": list(columns.dense),
    }
    contiguous = {name: np.ascontiguousarray(array) for name, array in arrays.items()}
    return safetensors.numpy.save(contiguous, metadata={"columns": json.dumps(described)})


def columns_from_bytes(blob: bytes) -> RequestColumns:
    arrays = safetensors.numpy.load(blob)
    (header_length,) = struct.unpack("<Q", blob[:8])
    described = json.loads(json.loads(blob[8 : 8 + header_length])["__metadata__"]["columns"])
    sparse = {
        name: (
            Jagged(arrays[f"s{index}.values"], arrays[f"s{index}.lengths"]),
            arrays[f"s{index}.mask"],
        )
        for index, name in enumerate(described["sparse"])
    }
    dense = {
        name: (arrays[f"d{index}.values"], arrays[f"d{index}.mask"])
        for index, name in enumerate(described["dense"])
    }
    return RequestColumns(
        user_id=described["user_id"],
        num_candidates=described["num_candidates"],
        item_ids=arrays["item_ids"],
        sparse=sparse,
        dense=dense,
        user_known=described["user_known"],
        item_known=arrays.get("item_known"),
        raw_user_id=described["raw_user_id"],
        raw_item_ids=described["raw_item_ids"],
    )


def preparation_frame(preparation: Preparation) -> bytes:
    """The `load` frame that gives the worker a version's rules and artifact."""
    rules = [
        {"spec": dataclasses.asdict(rule.spec), "bounded": rule.bounded}
        for rule in preparation.rules.values()
    ]
    files = {} if preparation.encoder is None else preparation.encoder.preprocessing.to_files()
    header = {
        "op": "load",
        "rules": rules,
        "user_column": preparation.user_column,
        "item_column": preparation.item_column,
        "artifact": list(files) if preparation.encoder is not None else None,
    }
    return frame(header, list(files.values()))


# -- the worker ----------------------------------------------------------------------------


def _read_frame(stream: BinaryIO) -> tuple[dict, bytes] | None:
    prefix = stream.read(FRAME.size)
    if len(prefix) < FRAME.size:
        return None
    header_length, payload_length = FRAME.unpack(prefix)
    header = json.loads(stream.read(header_length))
    return header, stream.read(payload_length)


def _loaded(header: dict, parts: list[bytes]) -> Preparation:
    rules = {
        rule["spec"]["name"]: FeatureRule(FeatureSpec(**rule["spec"]), rule["bounded"])
        for rule in header["rules"]
    }
    encoder = None
    if header["artifact"] is not None:
        files = dict(zip(header["artifact"], parts, strict=True))
        encoder = RawValueEncoder(
            Preprocessor.from_files(files), header["user_column"], header["item_column"], Counter()
        )
    return Preparation(rules, header["user_column"], header["item_column"], encoder)


def _answer(header: dict, body: bytes, preparation: Preparation | None) -> bytes:
    reply: dict[str, Any] = {"id": header["id"]}
    try:
        request = parse_request(body, header["max_candidates"])
        check_model(request, header["model"])
        if preparation is None or not header["ready"]:
            return frame({**reply, "outcome": "no version"})
        columns = prepare_columns(request, preparation)
    except RequestError as error:  # the client's: answered as on the loop
        message = str(error).removeprefix(f"{error.field}: ") if error.field else str(error)
        return frame(
            {
                **reply,
                "outcome": "refused",
                "error": type(error).__name__,
                "field": error.field,
                "message": message,
            }
        )
    except Exception as error:  # a bug of ours: a 500, as on the loop, and the worker goes on
        log.exception("the body parser failed on a body")
        return frame({**reply, "outcome": "failed", "message": repr(error)})
    unknown: dict[str, int] = {}
    if preparation.encoder is not None:
        unknown = dict(preparation.encoder.unknown)
        preparation.encoder.unknown.clear()
    return frame({**reply, "outcome": "columns", "unknown": unknown}, [columns_to_bytes(columns)])


def main() -> None:
    """Answer frames until stdin closes."""
    # The lowest CPU priority: where cores are short, the event loop and scoring go first
    # (nice 19 weighs about 1/70 of nice 0), and a large body waits for its parse rather than
    # every other client.
    os.nice(19)
    source, sink = sys.stdin.buffer, sys.stdout.buffer
    sink.write(frame({"id": 0, "outcome": "started"}))  # imports done: bodies are answered now
    sink.flush()
    preparation: Preparation | None = None
    while (read := _read_frame(source)) is not None:
        header, payload = read
        parts = split_parts(header, payload)
        if header["op"] == "load":
            preparation = _loaded(header, parts)
            continue
        sink.write(_answer(header, parts[0], preparation))
        sink.flush()


# -- the service's side ------------------------------------------------------------------------


class _Worker:
    """One worker process, its answers awaited by request id, and what it was last given."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.pending: dict[int, asyncio.Future] = {}
        self.sent: Preparation | None = None
        self.started = asyncio.get_running_loop().create_future()
        self.pending[0] = self.started
        self.reader = asyncio.create_task(self._read())

    @property
    def alive(self) -> bool:
        return self.process.returncode is None and not self.reader.done()

    async def _read(self) -> None:
        stream = self.process.stdout
        assert stream is not None
        try:
            while True:
                header_length, payload_length = FRAME.unpack(await stream.readexactly(FRAME.size))
                header = json.loads(await stream.readexactly(header_length))
                payload = await stream.readexactly(payload_length)
                answer = self.pending.pop(header["id"], None)
                if answer is not None and not answer.done():
                    answer.set_result((header, split_parts(header, payload)))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        code = await self.process.wait()
        gone = ParserGoneError(
            f"the body parser process ended (exit code {code}) before it answered; retry"
        )
        for answer in self.pending.values():
            if not answer.done():
                answer.set_exception(gone)
        self.pending.clear()


class BodyParser:
    """The worker process, seen from the event loop: `prepare` sends a body and awaits its
    columns while the loop serves others. One worker, bodies in turn; started again if it
    dies (the bodies it held are answered ParserGoneError)."""

    def __init__(self, model: str, max_candidates: int) -> None:
        self.model = model
        self.max_candidates = max_candidates
        self._worker: _Worker | None = None
        self._next_id = 0

    async def start(self) -> None:
        """Start the worker process (its imports take a second: see `wait_started`)."""
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "serving.parsing",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        self._worker = _Worker(process)

    async def wait_started(self) -> None:
        """Until the worker answers; ParserGoneError if it ended first (it cannot import)."""
        assert self._worker is not None
        await self._worker.started

    async def stop(self) -> None:
        worker, self._worker = self._worker, None
        if worker is None:
            return
        assert worker.process.stdin is not None
        worker.process.stdin.close()
        try:
            await asyncio.wait_for(worker.process.wait(), timeout=5)
        except TimeoutError:
            worker.process.kill()
            await worker.process.wait()
        await worker.reader

    async def prepare(
        self, body: bytes, preparation: Preparation | None, unknown: Counter[str]
    ) -> RequestColumns:
        """The body's columns, as `prepare_columns` gives them on the loop; raises the same
        RequestError, NoVersionError for a body valid as far as it can be checked without a
        version when `preparation` is None, ParserGoneError if the worker died on it."""
        if self._worker is None or not self._worker.alive:
            if self._worker is not None:
                log.error("the body parser process ended; starting another")
            await self.start()
        worker = self._worker
        assert worker is not None and worker.process.stdin is not None
        if preparation is not None and preparation != worker.sent:
            worker.process.stdin.write(preparation_frame(preparation))
            worker.sent = preparation
        self._next_id += 1
        answer = asyncio.get_running_loop().create_future()
        worker.pending[self._next_id] = answer
        header = {
            "op": "parse",
            "id": self._next_id,
            "model": self.model,
            "max_candidates": self.max_candidates,
            "ready": preparation is not None,
        }
        worker.process.stdin.write(frame(header, [body]))
        try:
            await worker.process.stdin.drain()
            reply, parts = await answer
        except ConnectionError as error:
            raise ParserGoneError(f"the body parser process is gone ({error}); retry") from None
        finally:
            worker.pending.pop(header["id"], None)
        if reply["outcome"] == "refused":
            raise _request_errors()[reply["error"]](reply["field"], reply["message"])
        if reply["outcome"] == "no version":
            raise NoVersionError("no version is loaded")
        if reply["outcome"] == "failed":
            raise RuntimeError(f"the body parser failed on a body: {reply['message']}")
        unknown.update(reply["unknown"])
        return columns_from_bytes(parts[0])


def _request_errors(cls: type[RequestError] = RequestError) -> dict[str, type[RequestError]]:
    """RequestError and its subclasses by name: the worker's error is raised as the same."""
    found = {cls.__name__: cls}
    for subclass in cls.__subclasses__():
        found.update(_request_errors(subclass))
    return found


if __name__ == "__main__":
    main()
