"""`embtab train --nproc 2`: sharded training from the command line, then `embtab eval`."""

from __future__ import annotations

import json

import pytest

from embtab.cli import main
from tests.models import tiny_movielens


@pytest.fixture
def tiny(tmp_path_factory, monkeypatch):
    cache = tmp_path_factory.getbasetemp() / "embtab-cli-data"
    cache.mkdir(exist_ok=True)
    monkeypatch.setenv("EMBTAB_DATA", str(cache))
    return tiny_movielens.prepare_tiny(cache)


def test_train_on_two_ranks_then_eval_the_export(tiny, tmp_path, capsys):
    out, export = tmp_path / "ranks", tmp_path / "plain.safetensors"
    argv = ["train", "--nproc", "2", "--model", "dlrm", "--method", "hash", "--budget", "0.5"]
    argv += ["--batch-size", "128", "--max-steps", "4", "--eval-rows", "300"]
    argv += ["--set", "tables.compress_min_rows=20", "--sharding", "item_id=row_wise"]
    argv += ["--out", str(out), "--export", str(export), "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["world_size"] == 2 and result["steps"] == 4
    assert result["plan"]["item_id"]["sharding_type"] == "row_wise"
    assert sorted(p.name for p in out.iterdir()) == [
        "rank-00000-of-00002.safetensors",
        "rank-00001-of-00002.safetensors",
    ]
    assert main(["eval", str(export), "--split", "valid", "--rows", "300", "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["metrics"]["logloss"] == pytest.approx(result["valid"]["logloss"], abs=1e-6)

    assert main(["train", "--nproc", "2", "--sharding", "item_id", "--out", str(out)]) == 2
    assert "--sharding takes TABLE=TYPE" in capsys.readouterr().err
