"""`kiln up`: one command starts SQLite, an embedded Redis, a worker, the reaper and the web."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import httpx
import psutil
import pytest

from app import settings as settings_module
from app.embedded import admin_token, free_port
from tests.conftest import ROOT

pytestmark = pytest.mark.integration

DIGIT_ZERO = [0, 0, 5, 13, 9, 1, 0, 0, 0, 0, 13, 15, 10, 15, 5, 0, 0, 3, 15, 2, 0, 11, 8, 0, 0, 4, 12, 0, 0, 8, 8, 0,
              0, 5, 8, 0, 0, 9, 8, 0, 0, 4, 11, 0, 1, 12, 7, 0, 0, 2, 14, 5, 10, 12, 0, 0, 0, 0, 6, 13, 10, 0, 0, 0]


def http(method: str, url: str, token: str, body: dict | None = None) -> dict:
    req = urllib.request.Request(url, method=method, data=json.dumps(body).encode() if body else None,
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


class KilnUp:
    """`kiln up` started as a terminal starts it: a process group of its own, output to a log."""

    def __init__(self, tmp_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp_path / f"up-{self.port}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
        env.update(KILN_VAR_DIR=str(tmp_path / "var"), PYTHONUNBUFFERED="1", KILN_TORCH_THREADS="1")
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "app.cli", "up", "--port", str(self.port)], cwd=ROOT,
                                     env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_token(self, timeout: float = 180) -> str:
        """Wait for the "running at" line; return the admin token printed under it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.text()
            if "admin API token:" in text:
                lines = text.split("admin API token:", 1)[1].strip().splitlines()
                if lines:
                    return lines[0].strip()
            assert self.proc.poll() is None, text[-3000:]
            time.sleep(0.1)
        raise AssertionError(f"kiln up printed no token:\n{self.text()[-3000:]}")

    def ctrl_c(self, timeout: float = 15) -> tuple[int, list[psutil.Process]]:
        """SIGINT to the whole process group, as a terminal's Ctrl-C; what still runs after ``timeout``."""
        family = [psutil.Process(self.proc.pid)] + psutil.Process(self.proc.pid).children(recursive=True)
        os.killpg(self.proc.pid, signal.SIGINT)
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
        _, alive = psutil.wait_procs(family, timeout=0.5)
        for p in alive:
            p.kill()
        self.log.close()
        return rc, alive

    def kill(self) -> None:
        for p in [psutil.Process(self.proc.pid)] + psutil.Process(self.proc.pid).children(recursive=True):
            p.kill()


def test_kiln_up_runs_a_job_end_to_end_and_stops_cleanly_on_ctrl_c(tmp_path):
    up = KilnUp(tmp_path)
    try:
        token = up.wait_for_token()
        assert token.startswith("kiln_"), up.text()
        assert f"Kiln is running at {up.url}" in up.text()
        # The line appears only once the web answers: no retry needed.
        with urllib.request.urlopen(up.url + "/readyz", timeout=5) as r:
            assert r.status == 200
        job = http("POST", up.url + "/api/v1/jobs", token, {
            "kind": "train", "name": "up-digits", "model": {"arch": "mlp", "hidden_sizes": [64]},
            "dataset": {"id": "builtin:digits"}, "hyperparameters": {"epochs": 3}})
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            job = http("GET", f"{up.url}/api/v1/jobs/{job['id']}", token)
            if job["state"] in ("succeeded", "failed"):
                break
            time.sleep(0.5)
        assert job["state"] == "succeeded", job
        assert (tmp_path / "var" / "kiln.db").exists() and (tmp_path / "var" / "storage").is_dir()
        assert stat.S_IMODE((tmp_path / "var" / "admin_token").stat().st_mode) == 0o600

        # A prediction does not wait behind a long training job.
        long = http("POST", up.url + "/api/v1/jobs", token, {
            "kind": "train", "name": "up-long", "model": {"arch": "gru", "hidden_size": 128, "num_layers": 2},
            "dataset": {"id": "builtin:digits"}, "hyperparameters": {"epochs": 200, "batch_size": 8}})
        while http("GET", f"{up.url}/api/v1/jobs/{long['id']}", token)["state"] != "running":
            time.sleep(0.2)
        pred = http("POST", up.url + "/api/v1/jobs", token, {"kind": "predict", "model": "up-digits@latest",
                                                            "inputs": [DIGIT_ZERO]})
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            pred = http("GET", f"{up.url}/api/v1/jobs/{pred['id']}", token)
            if pred["state"] in ("succeeded", "failed"):
                break
            time.sleep(0.2)
        assert pred["state"] == "succeeded", pred
        assert http("GET", f"{up.url}/api/v1/jobs/{long['id']}", token)["state"] == "running"
        assert pred["result"]["predictions"][0]["class"] == 0
    except BaseException:
        up.kill()
        raise
    # Ctrl-C with a training job running: every process is gone within the bound.
    rc, alive = up.ctrl_c()
    assert alive == [] and rc == 0, up.text()[-3000:]


def sign_in(url: str, email: str, password: str) -> httpx.Response:
    """Sign in as a browser does: the CSRF token from the form, then follow the redirect."""
    with httpx.Client(base_url=url, timeout=30, follow_redirects=True) as browser:
        form = browser.get("/login")
        csrf = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', form.text).group(1)
        return browser.post("/login", data={"csrf_token": csrf, "email": email, "password": password})


def test_kiln_up_prints_the_admin_password_once_and_ctrl_c_stops_everything_every_time(tmp_path):
    # Three runs on one var dir: the first prints a sign-in password, the later ones only how to reset it.
    for cycle in range(3):
        up = KilnUp(tmp_path)
        try:
            token = up.wait_for_token()
            if cycle == 0:
                found = re.search(rf"Sign in at {re.escape(up.url)}/login as admin@localhost with password (\S+)\n",
                                  up.text())
                assert found, up.text()[-3000:]
                assert "kiln users set-password admin@localhost" in up.text()
                landed = sign_in(up.url, "admin@localhost", found.group(1))
                assert landed.status_code == 200 and landed.url.path == "/jobs", (landed.url, landed.text[:500])
                assert "admin@localhost" in landed.text
                refused = sign_in(up.url, "admin@localhost", found.group(1) + "x")
                assert refused.url.path == "/login"
                assert found.group(1) not in (tmp_path / "var" / "admin_token").read_text()
            else:
                assert "with password" not in up.text(), up.text()[-3000:]
                assert "password printed on the first run" in up.text()
                assert f"kept in {tmp_path / 'var' / 'admin_token'}" in up.text()
            # Busy web workers: the deadlock this guards against came after a few requests.
            for _ in range(6):
                http("GET", up.url + "/api/v1/jobs", token)
                urllib.request.urlopen(up.url + "/readyz", timeout=10).close()
            descendants = psutil.Process(up.proc.pid).children(recursive=True)
            assert len(descendants) >= 5, [p.cmdline() for p in descendants]  # redis, 2 workers, reaper, web...
        except BaseException:
            up.kill()
            raise
        started = time.monotonic()
        rc, alive = up.ctrl_c(timeout=15)
        took = time.monotonic() - started
        assert alive == [], f"cycle {cycle}: still running after {took:.1f} s: {[p.pid for p in alive]}"
        assert rc == 0, up.text()[-3000:]


def test_admin_token_file_is_private_from_birth_and_reused(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'kiln.db'}"
    from app.migrate import upgrade

    upgrade(url)
    settings = settings_module.load({"KILN_DATABASE_URL": url, "KILN_VAR_DIR": str(tmp_path)})
    modes = []
    real_open = os.open

    def spy(path, flags, mode=0o777, *args, **kwargs):
        if str(path).endswith("admin_token"):
            modes.append((flags & os.O_EXCL, mode))
        return real_open(path, flags, mode, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy)
    os.umask(old := os.umask(0))  # no umask to hide a wide mode
    try:
        token = admin_token(settings, tmp_path)
    finally:
        os.umask(old)
    assert modes == [(os.O_EXCL, 0o600)]
    assert stat.S_IMODE((tmp_path / "admin_token").stat().st_mode) == 0o600
    assert admin_token(settings, tmp_path) == token  # reused, not a second admin


def _readme_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## A walk through with curl", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)```", section, flags=re.S)


def test_readme_walk_through_runs_pasted_as_one_block(tmp_path):
    blocks = _readme_blocks()
    assert blocks and "KILN_URL=${KILN_URL:-http://127.0.0.1:8000}" in blocks[0]
    up = KilnUp(tmp_path)
    try:
        token = up.wait_for_token()
        env = dict(os.environ, KILN_URL=up.url, TOKEN=token)
        for block in blocks:
            out = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", block], cwd=tmp_path, env=env,
                                 capture_output=True, text=True, timeout=240)
            assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert "predicted class: 0" in out.stdout, out.stdout[-3000:]
        jobs = http("GET", up.url + "/api/v1/jobs", token)
        items = jobs["items"] if isinstance(jobs, dict) else jobs
        states = {j["name"] or j["kind"]: j["state"] for j in items if j["kind"] == "train"}
        assert states.get("digits-mlp") == "succeeded", items
        assert states.get("digits-long") == "cancelled", items
    except BaseException:
        up.kill()
        raise
    rc, alive = up.ctrl_c()
    assert alive == [] and rc == 0
