"""Progress reporting for long work: a tqdm bar of rows (with rows/s) that names the stage."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from tqdm import tqdm


@contextlib.contextmanager
def rows_bar(title: str, enabled: bool = True) -> Iterator[Callable[[str, int], None]]:
    """A bar counting rows (with rows/s) per stage; calling the yielded function with (stage,
    rows) adds `rows`. A new stage restarts the count, with the first stage's rows as total
    (every pass over the data reads the same rows)."""
    with tqdm(desc=title, unit="rows", unit_scale=True, disable=not enabled, leave=False) as bar:
        current = ""
        first_stage_rows = 0

        def advance(stage: str, rows: int) -> None:
            nonlocal current, first_stage_rows
            if stage != current:
                if current and not first_stage_rows:
                    first_stage_rows = bar.n
                current = stage
                bar.reset(total=first_stage_rows or None)
                bar.set_description(f"{title} ({stage})")
            bar.update(rows)

        yield advance
