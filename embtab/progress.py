"""Progress reporting for long work: a tqdm bar whose description follows the current stage."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from tqdm import tqdm


@contextlib.contextmanager
def stage_bar(title: str, stages: int, enabled: bool = True) -> Iterator[Callable[[str], None]]:
    """A bar of `stages` steps; calling the yielded function with a message advances it."""
    with tqdm(total=stages, desc=title, unit="step", disable=not enabled, leave=False) as bar:
        seen = 0

        def advance(message: str) -> None:
            nonlocal seen
            if seen:
                bar.update(1)
            seen += 1
            bar.set_postfix_str(message)

        yield advance
        bar.update(bar.total - bar.n)
