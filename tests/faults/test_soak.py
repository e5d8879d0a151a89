"""The soak benchmark, shortened for CI: 60 s of load at concurrency 32 (10 s warm-up, then
five 10 s windows) on `/score` while `embtab stream run` pushes a delta every 2 s into the
served version. The benchmark itself runs 600 s (bench/results/soak.json)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SUMMARY_KEYS = {"requests", "errors", "p99_ms", "rss_growth_pct"}


def test_a_minute_of_load_while_deltas_flow_has_no_errors_and_no_memory_growth(tmp_path):
    out = tmp_path / "soak.json"
    command = [sys.executable, str(REPO / "bench" / "soak.py"), "--out", str(out)]
    command += ["--warmup", "10", "--seconds", "50", "--window", "10"]
    command += ["--train-rows", "20000", "--sync-interval", "2", "--threads", "1"]
    finished = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-4000:]
    report = json.loads(out.read_text())
    summary = report["summary"]
    assert set(summary) >= SUMMARY_KEYS
    assert report["machine"]["cores"] and "soak.py" in report["command"]
    windows = [result for result in report["results"] if result["case"] == "soak"]
    assert len(windows) == 5 and all(window["p99_ms"] > 0 for window in windows)
    assert summary["requests"] > 0 and summary["errors"] == 0 and summary["degraded"] == 0
    assert summary["deltas_served"] >= 3, "the service must have picked up deltas under load"
    assert summary["rss_growth_pct"] < 5.0
