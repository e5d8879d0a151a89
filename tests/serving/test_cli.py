"""`embtab publish CHECKPOINT` and `embtab serve --model NAME`, end to end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import numpy as np

from embtab.cli import main
from embtab.services import free_port
from models.checkpoint import save_checkpoint
from tests.serving.serving_helpers import reference_scores, request_body, tiny_model, unique_name


def test_publish_a_checkpoint_then_serve_it(redis_service, tmp_path, capsys):
    model = tiny_model("hash")
    checkpoint = save_checkpoint(tmp_path / "tiny.safetensors", model)
    name = unique_name("cli")
    url = redis_service.redis_url
    assert main(["publish", str(checkpoint), "--model", name, "--redis", url, "--json"]) == 0
    published = json.loads(capsys.readouterr().out)
    assert published["model"] == name and published["version"] == 1
    assert published["rows_written"]["item_id"] == 100

    assert (
        main(["publish", str(checkpoint), "--model", name, "--redis", url, "--encoding", "int8"])
        == 0
    )
    assert f"published {name} v2" in capsys.readouterr().out

    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "embtab.cli",
            "serve",
            "--model",
            name,
            "--redis",
            url,
            "--port",
            str(port),
            "--features-redis",
            "none",
            "--json",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        lines = [server.stdout.readline()]
        while lines[-1] not in ("}\n", ""):
            lines.append(server.stdout.readline())
        started = json.loads("".join(lines))
        assert started["url"] == f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=started["url"], timeout=5) as client:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
            items = np.arange(0, 400, 9)
            response = client.post("/score", json=request_body(2, items))
            assert response.status_code == 200 and response.json()["version"] == 2
            error = np.abs(np.array(response.json()["scores"]) - reference_scores(model, 2, items))
            assert error.max() < 2e-3
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=15)


def test_publish_without_redis_says_how_to_give_one(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("EMBTAB_REDIS", raising=False)
    checkpoint = save_checkpoint(tmp_path / "tiny.safetensors", tiny_model("full"))
    assert main(["publish", str(checkpoint)]) == 2
    assert "--redis redis://host:port/0" in capsys.readouterr().err
    assert main(["publish", str(tmp_path / "missing.safetensors"), "--redis", "redis://x"]) == 2
    assert "no checkpoint at" in capsys.readouterr().err


def test_an_unreachable_redis_is_reported_with_its_traceback(tmp_path, capsys):
    """A Redis that does not answer is a failure of the service, not of the input: the CLI
    shows where it happened (a traceback) and exits 1, unlike a bad-input error (one line, 2)."""
    checkpoint = save_checkpoint(tmp_path / "tiny.safetensors", tiny_model("full"))
    unreachable = f"redis://127.0.0.1:{free_port()}/0"
    assert main(["publish", str(checkpoint), "--redis", unreachable]) == 1
    error = capsys.readouterr().err
    assert "Traceback (most recent call last)" in error and "RedisUnavailableError" in error
    assert error.rstrip().splitlines()[-1].startswith("embtab: error: ")
