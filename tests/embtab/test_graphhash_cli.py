"""`embtab graphhash build`: clusters within budget, modularity, coverage, a loadable file."""

from __future__ import annotations

import json

import torch
from safetensors import safe_open

from embedding_tables.graphhash import mappings_from_tensors
from embtab.cli import main


def test_graphhash_build_reports_clusters_and_saves_loadable_mappings(capsys, tmp_path):
    out = tmp_path / "ml100k.safetensors"
    args = ["graphhash", "build", "--dataset", "movielens-100k", "--budget", "0.25"]
    assert main([*args, "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert 0 < report["num_user_clusters"] <= report["user_rows"] <= int(943 * 0.25)
    assert 0 < report["num_item_clusters"] <= report["item_rows"] <= int(1682 * 0.25)
    assert report["modularity"] > 0
    assert 0.5 < report["item_coverage"] <= 1.0
    with safe_open(str(out), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        mappings = mappings_from_tensors(tensors, handle.metadata())
    rows = mappings["item_id"].transform(torch.arange(1682))
    assert rows.min() >= 0 and rows.max() < report["item_rows"]


def test_graphhash_build_rejects_a_non_positive_budget(capsys):
    assert main(["graphhash", "build", "--dataset", "movielens-100k", "--budget", "0"]) == 2
    assert "--budget must be > 0" in capsys.readouterr().err
