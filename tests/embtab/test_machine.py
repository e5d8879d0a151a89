"""Benchmark results files: one writer, every file with the same head, written whole."""

from __future__ import annotations

import json

from embtab.machine import machine_info, write_results


def test_a_results_file_has_machine_command_date_setup_results_and_summary(tmp_path, capsys):
    path = tmp_path / "results" / "bench.json"
    path.parent.mkdir()
    path.write_text('{"summary": {"old": 1}}\n')
    write_results(path, machine_info(), [{"case": "a"}], {"ratio": 0.5}, setup={"batch": 4})
    document = json.loads(path.read_text())
    assert list(document) == ["machine", "command", "date", "setup", "results", "summary"]
    assert document["summary"] == {"ratio": 0.5} and document["setup"] == {"batch": 4}
    assert document["machine"]["cores"] >= 1 and "load_average_1min_at_start" in document["machine"]
    assert not list(path.parent.glob("*.partial"))
    assert json.loads(capsys.readouterr().out) == {"ratio": 0.5}
