"""`embtab train` / `embtab eval` and run configs from YAML / TOML with CLI overrides."""

from __future__ import annotations

import json

import pytest

from embtab.cli import main
from embtab.config import ConfigFileError, load_run_config, parse_override
from tests.models import tiny_movielens

FAST = ["--batch-size", "256", "--epochs", "1", "--set", "train.evals_per_epoch=1"]
SMALL_DCN = ["--set", "model.deep_mlp=[32]", "--set", "model.cross_layers=2"]


@pytest.fixture
def tiny(tmp_path_factory, monkeypatch):
    cache = tmp_path_factory.getbasetemp() / "embtab-cli-data"
    cache.mkdir(exist_ok=True)
    monkeypatch.setenv("EMBTAB_DATA", str(cache))
    return tiny_movielens.prepare_tiny(cache)


def test_yaml_and_toml_configs_load_and_overrides_win(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(
        "dataset: movielens-1m\n"
        "model: {name: dcn, structure: parallel}\n"
        "tables: {method: qr, budget: 0.1, overrides: {user_id: {method: full}}}\n"
        "train: {epochs: 2}\n"
    )
    toml_file = tmp_path / "run.toml"
    toml_file.write_text(
        'dataset = "movielens-1m"\n[model]\nname = "dcn"\nstructure = "parallel"\n'
        '[tables]\nmethod = "qr"\nbudget = 0.1\n[tables.overrides.user_id]\nmethod = "full"\n'
        "[train]\nepochs = 2\n"
    )
    from_yaml, from_toml = load_run_config(yaml_file), load_run_config(toml_file)
    assert from_yaml == from_toml
    assert from_yaml.model.structure == "parallel" and from_yaml.tables.budget == 0.1
    overridden = load_run_config(
        yaml_file, [("train.epochs", 5), parse_override("model.deep_mlp=[64, 32]")]
    )
    assert overridden.train.epochs == 5 and overridden.model.deep_mlp == (64, 32)
    assert overridden.model.structure == "parallel"


def test_bad_config_files_and_overrides_are_clear_errors(tmp_path):
    with pytest.raises(ConfigFileError, match="accepted: .yaml, .yml, .toml"):
        load_run_config(tmp_path / "run.json")
    broken = tmp_path / "broken.toml"
    broken.write_text("[model\nname = 1")
    with pytest.raises(ConfigFileError, match="does not parse"):
        load_run_config(broken)
    with pytest.raises(ConfigFileError, match="not KEY=VALUE"):
        parse_override("train.epochs")


def test_train_then_eval_from_the_command_line(tiny, tmp_path, capsys):
    out = tmp_path / "dcn.safetensors"
    argv = ["train", "--model", "dcn", "--method", "qr", "--budget", "0.5", "--json"]
    argv += FAST + SMALL_DCN + ["--set", "tables.compress_min_rows=20", "--out", str(out)]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model"] == "dcn" and result["method"] == "qr" and result["budget"] == 0.5
    assert 0.5 < result["test"]["auc"] <= 1 and result["checkpoint"] == str(out)
    assert result["table_bytes"] < result["full_table_bytes"]

    assert main(["eval", str(out), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["metrics"]["auc"] == pytest.approx(result["test"]["auc"], abs=1e-12)
    assert evaluated["split"] == "test" and evaluated["dataset"] == "movielens-1m"

    assert main(["eval", str(out), "--split", "valid"]) == 0
    assert capsys.readouterr().out.startswith(f"dcn from {out} on movielens-1m: valid AUC")


def test_train_summary_line(tiny, tmp_path, capsys):
    out = tmp_path / "lr.safetensors"
    assert main(["train", "--model", "lr", *FAST, "--out", str(out)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("lr on movielens-1m (full): test AUC ") and str(out) in line


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "transformer"], "unknown model 'transformer'; accepted:"),
        (
            ["--method", "lsh"],
            "unknown table method 'lsh'; accepted: collisionless, full, graphhash",
        ),
        (["--set", "features=[user_id, shoe_size]"], "unknown feature"),
        (["--model", "deepfm", "--set", "tables.overrides.item_id.dim=8"], "width equal"),
        (["--set", "train.epochs=many"], "train.epochs: expected an integer"),
    ],
)
def test_bad_train_input_exits_2_with_what_is_accepted(tiny, tmp_path, capsys, argv, message):
    out = tmp_path / "never.safetensors"
    assert main(["train", *argv, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_eval_of_a_truncated_checkpoint_is_an_error(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    assert main(["eval", str(bad)]) == 2
    assert "truncated" in capsys.readouterr().err
