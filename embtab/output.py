"""How every command reports: a one-line summary, or the full result as JSON with --json."""

from __future__ import annotations

import json


def emit(result: dict, summary: str, as_json: bool) -> None:
    print(json.dumps(result, indent=2, sort_keys=True) if as_json else summary, flush=True)
