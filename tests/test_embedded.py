"""`kiln up`: one command starts SQLite, an embedded Redis, a worker, the reaper and the web."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from app.embedded import free_port
from tests.conftest import ROOT

pytestmark = pytest.mark.integration


def http(method: str, url: str, token: str, body: dict | None = None) -> dict:
    req = urllib.request.Request(url, method=method, data=json.dumps(body).encode() if body else None,
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def test_kiln_up_runs_a_job_end_to_end_and_stops_cleanly_on_ctrl_c(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
    env.update(KILN_VAR_DIR=str(tmp_path / "var"), PYTHONUNBUFFERED="1", KILN_TORCH_THREADS="1")
    log = open(tmp_path / "up.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "up", "--port", str(port)], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        token = None
        while time.monotonic() < deadline and token is None:
            text = (tmp_path / "up.log").read_text(errors="replace")
            if "admin API token:" in text:
                lines = text.split("admin API token:", 1)[1].strip().splitlines()
                token = lines[0].strip() if lines else None
            time.sleep(0.2)
        assert token and token.startswith("kiln_"), (tmp_path / "up.log").read_text()
        url = f"http://127.0.0.1:{port}"
        assert f"Kiln is running at {url}" in (tmp_path / "up.log").read_text()
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url + "/readyz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.3)
        job = http("POST", url + "/api/v1/jobs", token, {
            "kind": "train", "name": "up-digits", "model": {"arch": "mlp", "hidden_sizes": [64]},
            "dataset": {"id": "builtin:digits"}, "hyperparameters": {"epochs": 3}})
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            job = http("GET", f"{url}/api/v1/jobs/{job['id']}", token)
            if job["state"] in ("succeeded", "failed"):
                break
            time.sleep(0.5)
        assert job["state"] == "succeeded", job
        assert (tmp_path / "var" / "kiln.db").exists() and (tmp_path / "var" / "storage").is_dir()

        # A prediction does not wait behind a long training job.
        long = http("POST", url + "/api/v1/jobs", token, {
            "kind": "train", "name": "up-long", "model": {"arch": "gru", "hidden_size": 128, "num_layers": 2},
            "dataset": {"id": "builtin:digits"}, "hyperparameters": {"epochs": 200, "batch_size": 8}})
        while http("GET", f"{url}/api/v1/jobs/{long['id']}", token)["state"] != "running":
            time.sleep(0.2)
        digit = [0, 0, 5, 13, 9, 1, 0, 0, 0, 0, 13, 15, 10, 15, 5, 0, 0, 3, 15, 2, 0, 11, 8, 0, 0, 4, 12, 0, 0, 8, 8, 0,
                 0, 5, 8, 0, 0, 9, 8, 0, 0, 4, 11, 0, 1, 12, 7, 0, 0, 2, 14, 5, 10, 12, 0, 0, 0, 0, 6, 13, 10, 0, 0, 0]
        pred = http("POST", url + "/api/v1/jobs", token, {"kind": "predict", "model": "up-digits@latest",
                                                         "inputs": [digit]})
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            pred = http("GET", f"{url}/api/v1/jobs/{pred['id']}", token)
            if pred["state"] in ("succeeded", "failed"):
                break
            time.sleep(0.2)
        assert pred["state"] == "succeeded", pred
        assert http("GET", f"{url}/api/v1/jobs/{long['id']}", token)["state"] == "running"
        assert pred["result"]["predictions"][0]["class"] == 0
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(timeout=45)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        log.close()
    assert rc == 0, (tmp_path / "up.log").read_text()[-3000:]
    # Every child (redis, worker, reaper, web) is gone with it.
    leftovers = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert leftovers == []
