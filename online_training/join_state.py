"""The joiner's windowed join state: open impressions, waiting clicks, and what is committable.

Per input partition, the impressions of each feature-log message are kept as a segment until
their window has passed the partition's watermark (`online_training.watermarks`); a request-id
index over them finds a click's impression, and drops an impression read again. A click read
before its impression waits for it. Rows labelled (by a click, or as negatives when their window
closes) wait in `_to_emit` for the joiner to send them as examples.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
from kafka import TopicPartition

from online_training import messages

OPEN = -1


@dataclass
class Segment:
    """The impressions of one feature-log message, kept until their window has passed."""

    partition: int
    offset: int
    rows: pa.RecordBatch
    request_ids: np.ndarray
    event_times: np.ndarray
    labels: np.ndarray
    open_rows: int
    # The lowest actions offset whose click joined a row here while other rows are still open:
    # re-reading this segment after a restart must re-read that click too.
    held_action_offset: float = math.inf
    to_emit: list[int] = field(default_factory=list)

    @property
    def last_event_time(self) -> float:
        return float(self.event_times.max()) if len(self.event_times) else -math.inf


@dataclass
class WaitingAction:
    """A click read before its impression (`impression_time` is its own event time when the
    message did not say: an upper bound, for expiring it)."""

    click: int
    impression_time: float
    partition: int
    offset: int
    event_time: float = math.nan


@dataclass
class PartitionState:
    """What the joiner knows about input partition p (of both topics)."""

    impression_clock: float = -math.inf
    action_clock: float = -math.inf
    impressions_ended: bool = False
    actions_ended: bool = False
    next_impression_offset: int | None = None
    next_action_offset: int | None = None
    segments: deque[Segment] = field(default_factory=deque)
    closed_up_to: float = -math.inf
    # Derived watermarks: the largest JSON event time of each topic, when a message of each
    # last came (the joiner's clock), and whether the producer sends watermarks itself.
    impression_latest: float = -math.inf
    action_latest: float = -math.inf
    impression_input_at: float = 0.0
    action_input_at: float = 0.0
    impression_watermarked: bool = False
    action_watermarked: bool = False

    @property
    def watermark(self) -> float:
        return min(self.impression_clock, self.action_clock)


class WindowedJoin:
    """The join state's half of `Joiner`: its settings, report, clock and the state itself
    (`partitions`, `index`, `waiting`, `retained_rows`, `_to_emit`) are the joiner's
    (`Joiner.__init__`)."""

    def _state(self, partition: int) -> PartitionState:
        state = self.partitions.get(partition)
        if state is None:
            now = self.clock()
            state = self.partitions[partition] = PartitionState(
                impression_input_at=now, action_input_at=now
            )
        return state

    def _add_impressions(
        self, state: PartitionState, partition: int, offset: int, batch: messages.Batch
    ) -> None:
        ids = batch.column("request_id")
        times = batch.column("event_time")
        self.report.impressions += len(ids)
        keep = times + self.config.window_s >= state.watermark
        self.report.stale_impressions += int((~keep).sum())
        _, first = np.unique(ids, return_index=True)
        unique = np.zeros(len(ids), dtype=bool)
        unique[first] = True
        unseen = np.fromiter((rid not in self.index for rid in ids.tolist()), bool, len(ids))
        fresh = unique & unseen
        self.report.duplicate_impressions += int((keep & ~fresh).sum())
        keep &= fresh
        if not keep.any():
            return
        rows = batch.rows if keep.all() else batch.rows.filter(pa.array(keep))
        kept_ids = ids[keep]
        segment = Segment(
            partition=partition,
            offset=offset,
            rows=rows,
            request_ids=kept_ids,
            event_times=times[keep],
            labels=np.full(len(kept_ids), OPEN, dtype=np.int8),
            open_rows=len(kept_ids),
        )
        state.segments.append(segment)
        self.retained_rows += len(kept_ids)
        kept = kept_ids.tolist()
        self.index.update(zip(kept, ((segment, row) for row in range(len(kept))), strict=True))
        if self.waiting:
            window = self.config.window_s
            for rid in self.waiting.keys() & set(kept):
                action = self.waiting.pop(rid)
                row = self.index[rid][1]
                if action.event_time - segment.event_times[row] > window:
                    self.report.late_clicks += 1
                    continue
                self._label(segment, row, action.click, action.offset)

    def _add_actions(
        self,
        partition: int,
        offset: int,
        ids: np.ndarray,
        clicks: np.ndarray,
        impression_times: np.ndarray,
        event_times: np.ndarray,
    ) -> None:
        """Join actions to their impressions; `impression_times` may be NaN (not sent): then
        the impression's own event time decides whether the click came within the window."""
        window = self.config.window_s
        watermark = self._state(partition).watermark
        late = event_times - impression_times > window
        self.report.actions += len(ids)
        self.report.late_clicks += int(late.sum())
        on_time = ~late
        for rid, click, impression_time, event_time in zip(
            ids[on_time].tolist(),
            clicks[on_time].tolist(),
            impression_times[on_time].tolist(),
            event_times[on_time].tolist(),
            strict=True,
        ):
            found = self.index.get(rid)
            if found is not None:
                segment, row = found
                label = segment.labels[row]
                if event_time - segment.event_times[row] > window or (label == 0 and click):
                    # After its window, or after the window closed it as a negative.
                    self.report.late_clicks += 1
                elif label == OPEN:
                    self._label(segment, row, click, offset)
                else:
                    self.report.duplicate_actions += 1
            elif rid in self.waiting:
                self.report.duplicate_actions += 1
            else:
                if math.isnan(impression_time):
                    impression_time = event_time
                if impression_time + window < watermark:
                    # Its impression's window has closed already (a negative went out).
                    self.report.late_clicks += 1
                    continue
                self.waiting[rid] = WaitingAction(
                    click, impression_time, partition, offset, event_time
                )
        while len(self.waiting) > self.config.max_pending_actions:
            del self.waiting[next(iter(self.waiting))]
            self.report.evicted_actions += 1

    def _label(self, segment: Segment, row: int, label: int, action_offset: int) -> None:
        segment.labels[row] = label
        segment.open_rows -= 1
        segment.to_emit.append(row)
        self._to_emit[id(segment)] = segment
        if segment.open_rows:
            segment.held_action_offset = min(segment.held_action_offset, action_offset)
        else:
            segment.held_action_offset = math.inf

    def _close_due(self, state: PartitionState) -> None:
        """Close as negatives the open rows whose window the partition's watermark has passed,
        and forget the segments past any re-delivery in the window."""
        window = self.config.window_s
        watermark = state.watermark
        if watermark > state.closed_up_to:
            state.closed_up_to = watermark
            for segment in state.segments:
                if segment.open_rows:
                    due = (segment.labels == OPEN) & (segment.event_times + window < watermark)
                    self._close(segment, np.flatnonzero(due))
            self._release(state, lambda s, w=watermark: s.last_event_time + window < w)

    def _expire_waiting(self) -> None:
        """Forget the waiting clicks whose impression's window has passed: orphans."""
        window = self.config.window_s
        marks = {partition: state.watermark for partition, state in self.partitions.items()}
        expired = [
            rid
            for rid, action in self.waiting.items()
            if action.impression_time + window < marks.get(action.partition, -math.inf)
        ]
        for rid in expired:
            del self.waiting[rid]
        self.report.orphan_clicks += len(expired)

    def _close(self, segment: Segment, rows: np.ndarray) -> None:
        """Close these open rows as negatives."""
        if not len(rows):
            return
        segment.labels[rows] = 0
        segment.open_rows -= len(rows)
        segment.to_emit.extend(rows.tolist())
        self._to_emit[id(segment)] = segment
        if not segment.open_rows:
            segment.held_action_offset = math.inf

    def _release(self, state: PartitionState, done: Callable[[Segment], bool]) -> None:
        """Forget the closed segments that `done` says are past any re-delivery in the window."""
        kept: deque[Segment] = deque()
        for segment in state.segments:
            if segment.open_rows or not done(segment):
                kept.append(segment)
            else:
                self._forget(segment)
        state.segments = kept

    def _forget(self, segment: Segment) -> None:
        for rid in segment.request_ids.tolist():
            self.index.pop(rid, None)
        self.retained_rows -= len(segment.request_ids)

    def _drop_partition(self, partition: int) -> None:
        """Forget everything held for a partition taken away."""
        state = self.partitions.pop(partition, None)
        for segment in state.segments if state is not None else ():
            self._forget(segment)
            self._to_emit.pop(id(segment), None)
        self.waiting = {rid: a for rid, a in self.waiting.items() if a.partition != partition}

    def _bound_memory(self) -> None:
        """Past max_pending_rows, forget the oldest segments: closed ones first (that only
        narrows de-duplication), then open ones, closing their rows early as negatives."""
        cap = self.config.max_pending_rows
        if self.retained_rows <= cap:
            return
        closed = sorted(
            (segment.event_times.min(), id(segment), state, segment)
            for state in self.partitions.values()
            for segment in state.segments
            if not segment.open_rows
        )
        for _, _, state, segment in closed:
            if self.retained_rows <= cap:
                return
            state.segments.remove(segment)
            self._forget(segment)
        while self.retained_rows > cap:
            heads = [state for state in self.partitions.values() if state.segments]
            state = min(heads, key=lambda s: s.segments[0].event_times.min())
            oldest = state.segments.popleft()
            self.report.evicted_impressions += oldest.open_rows
            self._close(oldest, np.flatnonzero(oldest.labels == OPEN))
            self._forget(oldest)

    def _committable(self, tp: TopicPartition) -> int | None:
        state = self.partitions.get(tp.partition)
        if state is None:
            return None
        if tp.topic == self.topics.feature_log:
            position = state.next_impression_offset
            held = [s.offset for s in state.segments if s.open_rows]
        else:
            position = state.next_action_offset
            held = [s.held_action_offset for s in state.segments if s.open_rows]
            held += [a.offset for a in self.waiting.values() if a.partition == tp.partition]
        if position is None:
            return None
        return int(min([position, *held]))
