"""The runner without Celery: claim, train through the recorder, retention, finish, duplicates."""

from __future__ import annotations

import uuid

import pytest

from app import storage
from app.accounts import create_user
from app.db import session_scope
from app.jobs import service
from app.jobs.schemas import parse_spec
from app.models import Checkpoint, Job, ModelVersion, User
from worker import runner

SPEC = {"kind": "train", "name": "runner-mlp", "model": {"arch": "mlp", "hidden_sizes": [32]},
        "dataset": {"id": "builtin:digits"}, "hyperparameters": {"epochs": 5, "learning_rate": 0.003},
        "checkpoint": {"every_epochs": 1, "keep_last": 2}}


@pytest.fixture
def submitted(settings):
    def _submit(spec: dict = SPEC) -> int:
        with session_scope(settings.database_url) as s:
            user, _ = create_user(session=s, email=f"runner-{id(spec)}-{s.query(Job).count()}@example.com")
            return service.submit(session=s, owner=user, spec=parse_spec(spec), settings=settings).id
    return _submit


def test_run_trains_registers_a_model_and_keeps_last_k_plus_best(settings, submitted):
    job_id = submitted()
    assert runner.run(job_id, 0, worker="inline", settings=settings) == "succeeded"
    with session_scope(settings.database_url) as s:
        job = s.get(Job, job_id)
        assert job.state == "succeeded" and job.attempts == 1 and job.progress == 1.0
        rows = s.query(Checkpoint).filter_by(job_id=job_id).order_by(Checkpoint.step).all()
        newest_two = {r.epoch for r in rows[-2:]}
        assert newest_two == {4, 5}
        assert len(rows) <= 3 and sum(r.is_best for r in rows) == 1
        for r in rows:
            assert storage.read_verified(settings.storage_root, r.path, r.sha256)
        on_disk = sorted(p.name for p in (settings.storage_root / f"jobs/{job_id}/checkpoints").iterdir())
        assert on_disk == sorted(r.path.rsplit("/", 1)[1] for r in rows)  # deleted rows left no files
        version = s.query(ModelVersion).filter_by(job_id=job_id).one()
        best = next(r for r in rows if r.is_best)
        assert version.checkpoint_id == best.id and version.signature["input_shape"]
        assert job.result["model"] == f"runner-mlp@{version.version}"


def test_a_second_message_for_the_same_job_is_dropped(settings, submitted):
    job_id = submitted({**SPEC, "hyperparameters": {"epochs": 1}})
    assert runner.run(job_id, 0, worker="inline", settings=settings) == "succeeded"
    assert runner.run(job_id, 0, worker="other", settings=settings) == "dropped"
    assert runner.run(job_id, 1, worker="other", settings=settings) == "dropped"
    with session_scope(settings.database_url) as s:
        assert s.get(Job, job_id).attempts == 1


def test_a_message_with_a_stale_token_is_dropped(settings, submitted):
    job_id = submitted({**SPEC, "hyperparameters": {"epochs": 1}})
    assert runner.run(job_id, 5, worker="inline", settings=settings) == "dropped"
    with session_scope(settings.database_url) as s:
        assert s.get(Job, job_id).state == "queued"


def test_a_problem_only_the_worker_sees_fails_as_user_error_with_no_retry(settings):
    from app import datasets

    with session_scope(settings.database_url) as s:
        user, _ = create_user(session=s, email="baddata@example.com")
        csv = b"a,y\n" + b"".join(f"{i},{i % 2}\n".encode() for i in range(30))
        ds = datasets.upload(session=s, owner=user, filename="d.csv", data=csv, settings=settings)
        # A window on a classification table passes the web's checks; only the loader can tell.
        spec = {**SPEC, "dataset": {"id": f"dataset:{ds.id}", "target": "y", "window": 5, "task": "classification"}}
        job_id = service.submit(session=s, owner=user, spec=parse_spec(spec), settings=settings).id
    assert runner.run(job_id, 0, worker="inline", settings=settings) == "failed"
    with session_scope(settings.database_url) as s:
        job = s.get(Job, job_id)
        assert job.state == "failed" and job.error_class == "user_error" and job.attempts == 1
        assert "window" in job.error_message


def test_a_stored_spec_this_release_rejects_fails_the_job_instead_of_looping(settings, submitted):
    job_id = submitted({**SPEC, "hyperparameters": {"epochs": 1}})
    with session_scope(settings.database_url) as s:
        job = s.get(Job, job_id)
        job.spec = {**job.spec, "model": {"arch": "retired-arch"}}
    assert runner.run(job_id, 0, worker="inline", settings=settings) == "failed"
    with session_scope(settings.database_url) as s:
        job = s.get(Job, job_id)
        assert job.error_class == "user_error" and "no longer valid" in job.error_message


def test_a_diverging_run_fails_as_user_error_with_advice(settings, submitted):
    job_id = submitted({**SPEC, "name": "diverges", "dataset": {"id": "builtin:diabetes", "normalize": False},
                        "hyperparameters": {"epochs": 3, "optimizer": "sgd", "learning_rate": 10.0}})
    assert runner.run(job_id, 0, worker="inline", settings=settings) == "failed"
    with session_scope(settings.database_url) as s:
        job = s.get(Job, job_id)
        assert job.error_class == "user_error" and "diverged" in job.error_message
        assert "learning_rate" in job.error_message and job.attempts == 1


def test_init_from_latest_is_pinned_at_submit_not_when_the_job_runs(settings):
    from app.web.serializers import job_detail

    base_spec = {**SPEC, "name": "pin-base", "hyperparameters": {"epochs": 1}}
    with session_scope(settings.database_url) as s:
        user, _ = create_user(session=s, email=f"pinned-{uuid.uuid4().hex[:8]}@example.com")
        first = service.submit(session=s, owner=user, spec=parse_spec(base_spec), settings=settings).id
    assert runner.run(first, 0, worker="inline", settings=settings) == "succeeded"
    with session_scope(settings.database_url) as s:
        user = s.get(User, s.get(Job, first).owner_id)
        tune = service.submit(session=s, owner=user, settings=settings, spec=parse_spec(
            {**SPEC, "name": "pin-tuned", "hyperparameters": {"epochs": 1}, "init_from": "pin-base@latest"}))
        tune_id = tune.id
        assert job_detail(s, tune)["init_from"] == "pin-base@1"
        # A newer version of the name arrives before the fine-tune runs.
        second = service.submit(session=s, owner=user, spec=parse_spec({**base_spec, "hyperparameters": {
            "epochs": 1, "seed": 7}}), settings=settings).id
    assert runner.run(second, 0, worker="inline", settings=settings) == "succeeded"
    with session_scope(settings.database_url) as s:
        newer = s.query(ModelVersion).filter_by(job_id=second).one()
        assert (newer.name, newer.version) == ("pin-base", 2)
        # Spoil version 2's file: loading it would fail the job, so success shows version 1 was read.
        ckpt = s.get(Checkpoint, newer.checkpoint_id)
        storage.resolve(settings.storage_root, ckpt.path).write_bytes(b"not these weights")
    assert runner.run(tune_id, 0, worker="inline", settings=settings) == "succeeded"
    with session_scope(settings.database_url) as s:
        job = s.get(Job, tune_id)
        assert job.state == "succeeded" and job_detail(s, job)["init_from"] == "pin-base@1"


def test_a_fine_tune_whose_pinned_version_was_deleted_fails_as_user_error(settings):
    base_spec = {**SPEC, "name": "gone-base", "hyperparameters": {"epochs": 1}}
    with session_scope(settings.database_url) as s:
        user, _ = create_user(session=s, email=f"gone-{uuid.uuid4().hex[:8]}@example.com")
        base = service.submit(session=s, owner=user, spec=parse_spec(base_spec), settings=settings).id
    assert runner.run(base, 0, worker="inline", settings=settings) == "succeeded"
    with session_scope(settings.database_url) as s:
        user = s.get(User, s.get(Job, base).owner_id)
        tune_id = service.submit(session=s, owner=user, settings=settings, spec=parse_spec(
            {**SPEC, "name": "gone-tuned", "hyperparameters": {"epochs": 1}, "init_from": "gone-base@latest"})).id
    with session_scope(settings.database_url) as s:
        s.delete(s.query(ModelVersion).filter_by(job_id=base).one())
    assert runner.run(tune_id, 0, worker="inline", settings=settings) == "failed"
    with session_scope(settings.database_url) as s:
        job = s.get(Job, tune_id)
        assert job.error_class == "user_error" and job.attempts == 1
        assert "'gone-base@latest'" in job.error_message and "no longer exists" in job.error_message
