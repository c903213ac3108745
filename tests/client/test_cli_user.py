"""The user commands of ``kiln`` (login, submit, status, logs, predict...) as real processes against a real server."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import tomllib

import pytest

from tests.client.conftest import IRIS_SPEC
from tests.conftest import ROOT

pytestmark = pytest.mark.integration

IRIS_ROWS = "sepal length,sepal width,petal length,petal width\n5.1,3.5,1.4,0.2\n6.7,3.0,5.2,2.3\n5.9,3.0,4.2,1.5\n"


@pytest.fixture
def kiln(tmp_path):
    """Run ``kiln ARGS`` as a process, with a private config directory and no KILN_URL/KILN_TOKEN."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
    env.update(XDG_CONFIG_HOME=str(tmp_path / "config"), PYTHONUNBUFFERED="1", COLUMNS="120")

    def _run(*args: str, timeout: float = 60, background: bool = False, **extra_env: str):
        command = [sys.executable, "-m", "app.cli", *args]
        if background:
            return subprocess.Popen(command, cwd=ROOT, env=env | extra_env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
        return subprocess.run(command, cwd=ROOT, env=env | extra_env, capture_output=True, text=True, timeout=timeout)

    _run.config = tmp_path / "config" / "kiln" / "config.toml"
    return _run


def test_login_checks_the_token_and_stores_it_privately(kiln, server):
    refused = kiln("login", server.url, "--token", "not-a-token")
    assert refused.returncode == 4, refused
    assert "401 Unauthorized" in refused.stderr and not kiln.config.exists()

    done = kiln("login", server.url, "--token", server.token)
    assert done.returncode == 0, done
    assert stat.S_IMODE(kiln.config.stat().st_mode) == 0o600
    assert tomllib.loads(kiln.config.read_text()) == {"url": server.url, "token": server.token}

    # A later command finds the server and the token in the file.
    listed = kiln("datasets", "--json")
    assert listed.returncode == 0, listed
    assert "builtin:iris" in [d["id"] for d in json.loads(listed.stdout)]
    # A flag wins over the file.
    assert kiln("jobs", "--token", "not-a-token").returncode == 4


def test_a_person_trains_watches_and_predicts_from_the_shell(kiln, server, worker, tmp_path):
    auth = {"KILN_URL": server.url, "KILN_TOKEN": server.token}
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(dict(IRIS_SPEC, name="shell-iris")))
    submitted = kiln("submit", str(spec), **auth)
    assert submitted.returncode == 0, submitted
    job_id = submitted.stdout.strip()
    assert job_id.isdigit()

    # Watch and follow it while it runs: both end when the job ends.
    watch = kiln("status", job_id, "--watch", background=True, **auth)
    follow = kiln("logs", job_id, "--follow", background=True, **auth)
    watched, watch_err = watch.communicate(timeout=300)
    followed, follow_err = follow.communicate(timeout=60)
    assert watch.returncode == 0, (watched, watch_err, worker.log())
    assert f"job {job_id}  succeeded  epoch 2/2" in watched and "100%" in watched
    assert follow.returncode == 0, follow_err
    transitions = [line.split("  ")[2] for line in followed.splitlines() if " -> " in line]
    assert transitions[0] == "- -> queued" and transitions[-1] == "running -> succeeded", followed
    assert "queued -> running" in transitions

    # The same spec as YAML, waited for: the id, then how it ended.
    yaml_spec = tmp_path / "spec.yaml"
    yaml_spec.write_text("kind: train\nname: shell-iris\nmodel: {arch: mlp, hidden_sizes: [16]}\n"
                         "dataset: {id: 'builtin:iris'}\nhyperparameters: {epochs: 2, batch_size: 16}\n")
    waited = kiln("submit", str(yaml_spec), "--wait", timeout=300, **auth)
    assert waited.returncode == 0, (waited, worker.log())
    second_id, last = waited.stdout.strip().splitlines()
    assert int(second_id) > int(job_id) and last.startswith(f"job {second_id}  succeeded")

    models = kiln("models", "--json", **auth)
    assert {"shell-iris@1", "shell-iris@2"} <= {m["ref"] for m in json.loads(models.stdout)}

    rows = tmp_path / "rows.csv"
    rows.write_text(IRIS_ROWS)
    predicted = kiln("predict", "shell-iris@latest", "--input", str(rows), "--wait", "--json", timeout=300, **auth)
    assert predicted.returncode == 0, (predicted, worker.log())
    result = json.loads(predicted.stdout)
    assert result["model"] == "shell-iris@2"
    assert len(result["predictions"]) == 3  # the header row was not sent as a row
    for p in result["predictions"]:  # iris's own class names, one probability per class
        assert p["class"] == ["setosa", "versicolor", "virginica"][p["index"]] and len(p["probabilities"]) == 3

    aliased = kiln("models", "alias", "shell-iris", "production", "1", **auth)
    assert aliased.returncode == 0 and aliased.stdout.strip() == "shell-iris@production -> shell-iris@1", aliased
    refused_alias = kiln("models", "alias", "shell-iris", "latest", "1", **auth)
    assert refused_alias.returncode != 0 and "latest" in refused_alias.stderr
    # Serving settings from the shell: a warm alias with its own limits, a version's limits, unalias.
    warm = kiln("models", "alias", "shell-iris", "staging", "2", "--warm", "--max-batch-size", "8",
                "--max-delay-ms", "3", **auth)
    assert warm.returncode == 0 and warm.stdout.strip() == "shell-iris@staging -> shell-iris@2", warm
    assert "warm, batch <= 8, wait <= 3 ms" in warm.stderr, warm
    described = json.loads(kiln("models", "alias", "shell-iris", "staging", "1", "--json", **auth).stdout)
    assert described["aliases"]["staging"] == 1  # moved without options: the settings stay
    assert described["alias_serving"]["staging"] == {"max_batch_size": 8, "max_delay_ms": 3, "warm": True}
    limits = kiln("models", "serving", "shell-iris", "2", "--max-batch-size", "4", "--json", **auth)
    assert limits.returncode == 0, limits
    assert json.loads(limits.stdout)["serving"] == {"max_batch_size": 4, "max_delay_ms": None}
    bad_limit = kiln("models", "serving", "shell-iris", "2", "--max-batch-size", "0", **auth)
    assert bad_limit.returncode != 0 and "max-batch-size" in bad_limit.stderr
    missing = kiln("models", "serving", "shell-iris", "9", "--max-batch-size", "4", **auth)
    assert missing.returncode != 0 and "404" in missing.stderr, missing
    unaliased = kiln("models", "unalias", "shell-iris", "staging", **auth)
    assert unaliased.returncode == 0 and unaliased.stdout.strip() == "removed shell-iris@staging", unaliased
    models_json = json.loads(kiln("models", "alias", "shell-iris", "production", "1", "--json", **auth).stdout)
    assert "staging" not in models_json["aliases"]
    # The alias answers with the version it names.
    table = kiln("predict", "shell-iris@production", "--input", str(rows), "--wait", timeout=300, **auth)
    assert table.returncode == 0, table
    lines = [line.split() for line in table.stdout.splitlines()]
    assert lines[:2] == [["model", "shell-iris@1"], ["ROW", "CLASS", "CONFIDENCE"]]
    assert [row[0] for row in lines[2:]] == ["0", "1", "2"]
    assert all(row[1] in ("setosa", "versicolor", "virginica") and 0 < float(row[2]) <= 1 for row in lines[2:])

    listed = kiln("jobs", "--kind", "train", "--state", "succeeded", **auth)
    assert listed.stdout.splitlines()[0].split() == ["ID", "KIND", "NAME", "STATE", "PROGRESS", "EPOCH", "CREATED",
                                                     "ERROR"]
    assert {job_id, second_id} <= {line.split()[0] for line in listed.stdout.splitlines()[1:]}

    refused = kiln("cancel", job_id, **auth)
    assert refused.returncode == 7 and "409 Conflict" in refused.stderr


def test_a_bad_spec_exits_with_the_field_message(kiln, server, tmp_path):
    spec = tmp_path / "bad.json"
    spec.write_text(json.dumps(dict(IRIS_SPEC, hyperparameters={"epochs": 0})))
    result = kiln("submit", str(spec), "--url", server.url, "--token", server.token)
    assert result.returncode == 8, result
    assert result.stderr.startswith("kiln: error: 422 Invalid job specification")
    assert "  hyperparameters.epochs: " in result.stderr


def test_an_unknown_job_is_not_found(kiln, server):
    result = kiln("status", "2000000000", "--url", server.url, "--token", server.token)
    assert result.returncode == 6, result
    assert result.stderr.startswith("kiln: error: 404 Not Found")


def test_a_dataset_upload_is_listed(kiln, server, tmp_path):
    auth = {"KILN_URL": server.url, "KILN_TOKEN": server.token}
    data = tmp_path / "flowers.csv"
    data.write_text("a,b,label\n" + "".join(f"{i},{i * 2},{i % 2}\n" for i in range(20)))
    uploaded = kiln("datasets", "upload", str(data), "--name", "flowers", **auth)
    assert uploaded.returncode == 0, uploaded
    dataset_id = uploaded.stdout.strip()
    assert dataset_id.startswith("dataset:")
    listed = json.loads(kiln("datasets", "--json", **auth).stdout)
    assert {"id": dataset_id, "name": "flowers", "rows": 20}.items() <= next(
        d for d in listed if d["id"] == dataset_id).items()


def test_tokens_are_created_listed_and_revoked_from_the_shell(kiln, server):
    auth = {"KILN_URL": server.url}
    created = kiln("tokens", "create", "laptop", "--json", KILN_TOKEN=server.token, **auth)
    assert created.returncode == 0, created
    token = json.loads(created.stdout)
    new_token, token_id = token["token"], token["id"]
    # The new token works on its own, and the list shows it by name (never its plain text).
    listed = kiln("tokens", "--json", KILN_TOKEN=new_token, **auth)
    assert listed.returncode == 0, listed
    shown = {t["id"]: t for t in json.loads(listed.stdout)}
    assert shown[token_id]["name"] == "laptop" and new_token not in listed.stdout
    revoked = kiln("tokens", "revoke", str(token_id), KILN_TOKEN=server.token, **auth)
    assert revoked.returncode == 0, revoked
    assert kiln("jobs", KILN_TOKEN=new_token, **auth).returncode == 4  # 401 from now on
