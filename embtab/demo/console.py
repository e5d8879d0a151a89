"""The live status line: stream progress, examples/s, lag, last sync, serving p99, window AUC."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable

from online_training.trainer import Trainer

INTERVAL_S = 2.0


class StatusLine:
    """Prints one line every INTERVAL_S (in place on a terminal) while a trainer is attached."""

    def __init__(self, serving_p99_ms: Callable[[], float | None]) -> None:
        self.serving_p99_ms = serving_p99_ms
        self.split: str | None = None
        self.trainer: Trainer | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-status", daemon=True)
        self._tty = sys.stdout.isatty()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def attach(self, split: str, trainer: Trainer) -> None:
        self.split, self.trainer = split, trainer

    def detach(self) -> None:
        if self.trainer is not None:
            self._print(final=True)
        self.trainer = None

    def line(self) -> str | None:
        trainer = self.trainer
        if trainer is None:
            return None
        status = trainer.status()
        p99 = self.serving_p99_ms()
        parts = [
            f"replay {self.split}: {status.examples:,} examples",
            f"{status.examples_per_s:,.0f} ex/s",
            f"lag {status.lag if status.lag is not None else '-'}",
            "last sync "
            + (
                f"{status.last_sync_age_s:.1f} s ago" if status.last_sync_age_s is not None else "-"
            ),
            f"serving p99 {p99:.1f} ms" if p99 is not None else "serving p99 -",
            "window AUC "
            + (f"{status.last_window_auc:.3f}" if status.last_window_auc is not None else "-"),
        ]
        return " | ".join(parts)

    def _print(self, final: bool = False) -> None:
        text = self.line()
        if text is None:
            return
        if self._tty and not final:
            print(f"\r{text}\033[K", end="", flush=True)
        else:
            print(("\r" if self._tty else "") + text, flush=True)

    def _run(self) -> None:
        while not self._stop.wait(INTERVAL_S):
            self._print()
