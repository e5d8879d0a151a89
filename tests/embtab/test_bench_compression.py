"""`embtab bench compression` / `retrieval`: the quick grid end to end on the tiny data set,
resuming, atomic results files, bad input, and how a method at a budget becomes tables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from embtab.cli import main
from embtab.commands import bench
from embtab.compression import results as results_module
from embtab.compression import runner
from embtab.compression.errors import InfeasibleCellError, StudyConfigError
from embtab.compression.grid import compression_study
from embtab.compression.report import CTR_METRICS, Point, compression_summary, pareto_front
from embtab.compression.results import ResultsFile
from embtab.compression.tables import UNIFIED_TABLE, cell_tables, planned_bytes
from feature_store.schema import FeatureSpec, Schema
from tests.models import tiny_movielens

# The tiny set's user (60 ids) and item (40 ids) tables are compressed; the rest stay full.
TINY = ["--compress-min-rows", "20", "--batch-size", "512"]
QUICK_STEM = "compression_movielens-1m_dcn_quick"

MOVIELENS_1M = Schema(
    dataset="movielens-1m",
    features=(
        FeatureSpec("user_id", "categorical", 6040),
        FeatureSpec("item_id", "categorical", 3706),
        FeatureSpec("age", "categorical", 8),
        FeatureSpec("zip_code", "categorical", 3440),
        FeatureSpec("genres", "categorical", 18, max_length=6),
        FeatureSpec("hist_item_id", "sequence", 3706, max_length=20, shares_ids_with="item_id"),
        FeatureSpec("user_activity", "dense"),
    ),
    id_columns={"user": "user_id", "item": "item_id"},
)


@pytest.fixture
def tiny(tmp_path_factory, monkeypatch):
    cache = tmp_path_factory.getbasetemp() / "embtab-bench-data"
    cache.mkdir(exist_ok=True)
    monkeypatch.setenv("EMBTAB_DATA", str(cache))
    return tiny_movielens.prepare_tiny(cache)


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def test_quick_grid_writes_results_table_and_plot(tiny, tmp_path, capsys):
    assert main(["bench", "compression", "--quick", *TINY, "--out", str(tmp_path)]) == 0
    assert "runs done" in capsys.readouterr().out
    document = read(tmp_path / f"{QUICK_STEM}.json")
    assert {"machine", "command", "date", "results", "summary"} <= set(document)
    assert document["command"].startswith("embtab bench compression --dataset movielens-1m")
    summary = document["summary"]
    done = [r for r in document["results"] if r["status"] == "done"]
    # full at 1.0, the 8 other methods at budgets 1.0 and 0.1, one seed
    assert len(document["results"]) == 17 and summary["cells"] == len(done) >= 10
    assert 0.0 <= summary["auc_full"] <= 1.0
    for record in done:
        assert record["bytes_allocated"] == sum(record["bytes_by_table"].values())
        assert record["memory_fraction"] == record["bytes_allocated"] / record["full_bytes"]
        assert {"auc", "logloss"} <= set(record["test"]) and record["train_seconds"] >= 0
        if record["budget"] == 0.1:
            assert summary[f"auc_at_0.1_{record['method']}"] >= record["test"]["auc"]
            if record["method"] != "collisionless":  # its id map is not budgeted
                assert record["compressed_tables_fraction"] <= 0.1
    skipped = [r for r in document["results"] if r["status"] == "skipped"]
    # 60 user ids in 6 rows: no qr cover of 2 to 8 partitions fits
    assert {r["cell"] for r in skipped} >= {"qr_mult@0.1#0", "qr_add@0.1#0"}
    assert all("unique combination" in r["reason"] for r in skipped if r["method"] == "qr_add")
    table = (tmp_path / f"{QUICK_STEM}.md").read_text()
    assert "| full | " in table and "budget 0.1" in table and "Skipped" in table
    image = tmp_path / f"{QUICK_STEM}.png"
    assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and image.stat().st_size < 300_000


def test_rerun_skips_finished_cells(tiny, tmp_path, capsys):
    argv = ["bench", "compression", "--quick", *TINY, "--out", str(tmp_path), "--json"]
    assert main([*argv, "--methods", "full,hash", "--budgets", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["ran"] == 2
    assert main([*argv, "--methods", "full,hash,unified", "--budgets", "1"]) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["ran"] == 1 and second["summary"]["cells"] == 3
    document = read(tmp_path / f"{QUICK_STEM}.json")
    assert [r["cell"] for r in document["results"]] == ["full@1#0", "hash@1#0", "unified@1#0"]
    assert [i["cells_run"] for i in document["invocations"]] == [2, 1]
    assert all(i["seconds"] > 0 for i in document["invocations"])


def test_interrupted_run_leaves_a_valid_file_and_resumes(tiny, tmp_path, capsys, monkeypatch):
    calls = []
    real_run_cell = runner.run_cell

    def interrupted(*args, **kwargs):
        calls.append(args[1].key)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_run_cell(*args, **kwargs)

    monkeypatch.setattr(runner, "run_cell", interrupted)
    argv = ["bench", "compression", "--quick", *TINY, "--out", str(tmp_path), "--json"]
    argv += ["--methods", "full,hash,qr_add", "--budgets", "1"]
    assert main(argv) == 130
    capsys.readouterr()
    document = read(tmp_path / f"{QUICK_STEM}.json")
    assert [r["cell"] for r in document["results"]] == ["full@1#0"]
    assert (tmp_path / f"{QUICK_STEM}.md").exists()

    monkeypatch.setattr(runner, "run_cell", real_run_cell)
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["ran"] == 2
    assert read(tmp_path / f"{QUICK_STEM}.json")["summary"]["cells"] == 3


def test_a_failed_write_keeps_the_previous_document(tmp_path, monkeypatch):
    path = tmp_path / "study.json"
    results = ResultsFile.open(path, {"kind": "x"}, "embtab bench", lambda records: {})
    results.record({"cell": "a", "status": "done"})
    before = path.read_text()

    def torn(document, handle, **kwargs):
        handle.write('{"results": [')
        raise OSError("disk full")

    monkeypatch.setattr(results_module.json, "dump", torn)
    with pytest.raises(OSError, match="disk full"):
        results.record({"cell": "b", "status": "done"})
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["study.json"]


def test_other_settings_are_not_overwritten_unless_restarted(tiny, tmp_path, capsys):
    argv = ["bench", "compression", "--quick", *TINY, "--out", str(tmp_path)]
    argv += ["--methods", "hash", "--budgets", "1"]
    assert main(argv) == 0
    capsys.readouterr()
    assert main([*argv, "--epochs", "2"]) == 2
    error = capsys.readouterr().err
    assert "other settings" in error and "--restart" in error
    assert main([*argv, "--epochs", "2", "--restart"]) == 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--methods", "hash,lsh"], "unknown method 'lsh'; accepted: full, hash, unified"),
        (["--budgets", "1,1.5"], "budget 1.5 is outside (0, 1]"),
        (["--budgets", "0"], "budget 0.0 is outside (0, 1]"),
        (["--model", "din"], "unknown model 'din' for the compression study; accepted: dcn"),
        (["--seeds", "-1"], "seeds must be one or more ints >= 0"),
    ],
)
def test_bad_input_is_an_error_before_anything_runs(tmp_path, capsys, monkeypatch, argv, message):
    def never(*args, **kwargs):
        raise AssertionError("the data set was loaded before the input was checked")

    monkeypatch.setattr(bench, "load_with_progress", never)
    assert main(["bench", "compression", *argv, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_retrieval_study_reports_recall_and_ndcg(tiny, tmp_path, capsys):
    argv = ["bench", "retrieval", "--quick", *TINY, "--out", str(tmp_path), "--json"]
    argv += ["--methods", "full,hash,double_hash,graphhash", "--budgets", "0.25"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)["summary"]
    for key in ("recall20_full", "recall20_hash_0.25", "recall20_double_hash_0.25"):
        assert 0.0 <= summary[key] <= 1.0
    document = read(tmp_path / "retrieval_movielens-1m_quick.json")
    double = next(r for r in document["results"] if r["cell"] == "double_hash@0.25#0")
    # two hash functions into one table per id side, no clusters
    assert all(t["cluster_rows"] == 0 for t in double["options"]["tables"].values())
    assert (tmp_path / "retrieval_movielens-1m_quick.png").exists()


def test_budget_compresses_the_large_tables_and_keeps_small_ones_full():
    tables = cell_tables(MOVIELENS_1M, "hash", 0.1, 16, 1000)
    assert tables.compressed == ("user_id", "item_id", "zip_code")
    by_name = {t.name: t for t in tables.tables}
    assert by_name["age"].method.name == "full" and by_name["genres"].method.name == "full"
    assert tables.feature_to_table["hist_item_id"] == "item_id"
    compressed = sum(by_name[n].num_embeddings * 64 for n in tables.compressed)
    small = tables.full_bytes - compressed
    assert planned_bytes(tables) <= 0.1 * compressed + small


def test_unified_is_one_table_sized_to_the_budget_total():
    tables = cell_tables(MOVIELENS_1M, "unified", 0.25, 16, 1000)
    shared = next(t for t in tables.tables if t.name == UNIFIED_TABLE)
    assert shared.num_embeddings == 6040 + 3706 + 3440 and shared.budget == 0.25
    routed = {f for f, t in tables.feature_to_table.items() if t == UNIFIED_TABLE}
    assert routed == {"user_id", "item_id", "zip_code", "hist_item_id"}


def test_qr_takes_more_partitions_when_two_do_not_fit():
    at_tenth = cell_tables(MOVIELENS_1M, "qr_mult", 0.1, 16, 1000).decisions
    at_percent = cell_tables(MOVIELENS_1M, "qr_mult", 0.01, 16, 1000).decisions
    assert at_tenth["user_id"]["partitions"] == 2
    assert at_percent["user_id"]["partitions"] >= 3
    tables = cell_tables(MOVIELENS_1M, "qr_add", 0.01, 16, 1000)
    by_name = {t.name: t for t in tables.tables}
    assert planned_bytes(tables) <= tables.full_bytes * 0.02
    assert by_name["item_id"].method.combine == "add"


def test_collisionless_capacity_is_the_budget_and_graph_methods_hash_other_tables():
    collisionless = cell_tables(MOVIELENS_1M, "collisionless", 0.1, 16, 1000)
    user = next(t for t in collisionless.tables if t.name == "user_id")
    assert user.method.capacity == 604 and user.method.min_count == 1
    graph = cell_tables(MOVIELENS_1M, "double_graphhash", 0.1, 16, 1000)
    methods = {
        t.name: (t.method.name, getattr(t.method, "graphhash_variant", None)) for t in graph.tables
    }
    assert methods["user_id"] == ("graphhash", "double") and methods["zip_code"][0] == "hash"


def test_raw_64_bit_ids_get_hash_tables_in_every_cell():
    """A spec's `ids: hash` feature holds raw int64 ids: no cell may index a table by them."""
    raw_users = Schema(
        dataset="own-data",
        features=(
            FeatureSpec("user_id", "categorical", 5000, hashed=True),
            FeatureSpec("item_id", "categorical", 3000),
            FeatureSpec("device", "categorical", 7, hashed=True),
        ),
        id_columns={"user": "user_id", "item": "item_id"},
    )
    full = {t.name: t for t in cell_tables(raw_users, "full", 1.0, 16, 1000).tables}
    assert (full["user_id"].method.name, full["user_id"].budget) == ("hash", None)
    assert (full["device"].method.name, full["device"].budget) == ("hash", None)
    assert full["item_id"].method.name == "full"
    for method in ("qr_mult", "graphhash", "double_hash"):
        cell = cell_tables(raw_users, method, 0.1, 16, 1000)
        user = next(t for t in cell.tables if t.name == "user_id")
        assert (user.method.name, user.budget) == ("hash", 0.1), method
        assert cell.decisions["user_id"] == {"method": "hash", "why": "raw 64-bit ids"}


def test_infeasible_cells_say_why():
    with pytest.raises(InfeasibleCellError, match="budget 1.0 only"):
        cell_tables(MOVIELENS_1M, "full", 0.5, 16, 1000)
    criteo = Schema("synthetic-criteo", (FeatureSpec("cat_0", "categorical", 50_000),))
    with pytest.raises(InfeasibleCellError, match="no user and item id columns"):
        cell_tables(criteo, "graphhash", 0.1, 16, 1000)
    with pytest.raises(InfeasibleCellError, match="no table has >= 100000 ids"):
        cell_tables(criteo, "hash", 0.1, 16, 100_000)


def test_a_cell_over_the_memory_limit_is_skipped_with_the_reason(tiny):
    study = compression_study(
        methods=("hash",), budgets=(1.0,), seeds=(0,), compress_min_rows=20, max_table_bytes=100
    )
    record = runner.run_cell(study, study.cells()[0], tiny)
    assert record["status"] == "skipped" and "over the limit of 100 bytes" in record["reason"]


def test_study_options_are_checked():
    with pytest.raises(StudyConfigError, match="unknown study option"):
        compression_study(layers=3)
    with pytest.raises(StudyConfigError, match="train.epochs must be >= 1"):
        compression_study(epochs=0)
    assert compression_study(methods=("qr",)).methods == ("qr_mult", "qr_add", "qr_concat")


def test_pareto_front_keeps_points_no_cheaper_point_beats():
    def point(bytes_allocated: float, auc: float, logloss: float) -> Point:
        means = {"auc": auc, "logloss": logloss}
        return Point("hash", 0.1, 1, bytes_allocated, 0.1, means, means, means)

    found = [point(100, 0.70, 0.60), point(10, 0.72, 0.58), point(1000, 0.75, 0.62)]
    auc, logloss = CTR_METRICS
    assert [p.bytes_allocated for p in pareto_front(found, auc)] == [10, 1000]
    assert [p.bytes_allocated for p in pareto_front(found, logloss)] == [10]


def test_the_best_method_at_a_budget_is_the_best_of_those_within_that_budget():
    def record(method, budget, auc, compressed, seed=0):
        return {
            "status": "done",
            "method": method,
            "budget": budget,
            "seed": seed,
            "bytes_allocated": 1000,
            "memory_fraction": 1.0 if compressed is None else 0.009 + compressed * 0.9,
            "compressed_tables_fraction": compressed,
            "test": {"auc": auc, "logloss": 0.5},
        }

    records = [
        record("full", 1.0, 0.76, None),
        record("full", 1.0, 0.74, None, seed=1),
        record("hash", 0.1, 0.72, 0.0999),
        record("robe", 0.1, 0.73, 0.1),
        record("collisionless", 0.1, 0.745, 0.52),  # its id map spends far more
        record("qr_mult", 0.25, 0.749, 0.25),
        record("qr_mult", 0.01, 0.70, 0.0099),
        record("hash", 0.01, 0.69, 0.0099),
        record("hash", 0.01, 0.71, 0.0101, seed=1),  # one seed over the budget: not within
    ]
    summary = compression_summary(records)
    assert summary["best_method_at_0.1"] == "robe"
    assert summary["best_auc_gap_at_0.1"] == pytest.approx(0.75 - 0.73)
    assert summary["best_method_at_0.01"] == "qr_mult"
    assert summary["best_auc_gap_at_0.01"] == pytest.approx(0.05)
    assert summary["auc_mean_at_0.25_qr_mult"] == 0.749
    assert summary["memory_fraction_at_0.1_collisionless"] == pytest.approx(0.009 + 0.52 * 0.9)
