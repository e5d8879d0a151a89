"""`embtab train --nproc 2`: sharded training from the command line (local ranks, and ranks
started by torchrun), then `embtab eval`."""

from __future__ import annotations

import json
import subprocess
import sys

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

    # The same run with its ranks started by torchrun instead (what a multi-host run uses); the
    # world size is torchrun's (an --nproc here would be read by torchrun as --nproc-per-node).
    del argv[argv.index("--nproc") : argv.index("--nproc") + 2]
    argv[argv.index(str(out))] = str(tmp_path / "torchrun")
    argv[argv.index(str(export))] = str(tmp_path / "torchrun.safetensors")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", "2", "-m", "embtab.cli", *argv]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    torchrun = json.loads(done.stdout[done.stdout.index("{") :])
    assert torchrun["world_size"] == 2 and torchrun["steps"] == 4
    assert torchrun["final_loss"] == pytest.approx(result["final_loss"], abs=1e-6)
    assert torchrun["valid"]["logloss"] == pytest.approx(result["valid"]["logloss"], abs=1e-6)
