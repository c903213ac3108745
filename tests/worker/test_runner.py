"""The runner without Celery: claim, train through the recorder, retention, finish, duplicates."""

from __future__ import annotations

import uuid

import pytest

from app import storage
from app.accounts import create_user
from app.db import session_scope
from app.jobs import service
from app.jobs.schemas import parse_spec
from app.models import Attempt, Checkpoint, Job, JobEvent, ModelVersion, User
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


def _truncate(settings, session, ckpt: Checkpoint) -> None:
    """Cut a checkpoint's file short and record the cut bytes' sha256, as a torn copy would leave it."""
    data = storage.read_verified(settings.storage_root, ckpt.path, ckpt.sha256)
    size, digest = storage.write_atomic(settings.storage_root, ckpt.path, data[: len(data) * 2 // 3])
    ckpt.size_bytes, ckpt.sha256 = size, digest


def test_a_truncated_newest_checkpoint_with_a_matching_sha256_falls_back_to_the_one_before(
        settings, submitted, monkeypatch):
    job_id = submitted({**SPEC, "name": "torn-resume", "dataset": {"id": "builtin:iris"},
                        "hyperparameters": {"epochs": 5, "batch_size": 32, "log_every_steps": 1}})
    original = runner.Recorder.on_metrics

    def stop_mid_epoch_2(self, scope, epoch, step, values):
        original(self, scope, epoch, step, values)
        if self.token == 1 and scope == "step" and step == 6:
            self.request_stop("shutdown")  # as SIGTERM would: checkpoint mid-epoch, back to the queue

    monkeypatch.setattr(runner.Recorder, "on_metrics", stop_mid_epoch_2)
    assert runner.run(job_id, 0, worker="inline", settings=settings) == "queued"
    with session_scope(settings.database_url) as s:
        newest, previous = s.query(Checkpoint).filter_by(job_id=job_id).order_by(
            Checkpoint.step.desc(), Checkpoint.id.desc()).limit(2).all()
        assert newest.reason == "shutdown" and newest.step > previous.step and newest.path != previous.path
        _truncate(settings, s, newest)
        previous_epoch, previous_step = previous.epoch, previous.step

    assert runner.run(job_id, 1, worker="inline", settings=settings) == "succeeded"
    with session_scope(settings.database_url) as s:
        job = s.get(Job, job_id)
        assert job.state == "succeeded" and job.attempts == 2 and job.result["epochs_completed"] == 5
        assert job.resumed_from_epoch == previous_epoch
        skipped = s.query(JobEvent).filter_by(job_id=job_id, kind="checkpoint_skipped").all()
        assert len(skipped) == 1 and "does not parse" in skipped[0].message
        second = s.query(Attempt).filter_by(job_id=job_id, number=2).one()
        assert (second.start_epoch, second.start_step) == (previous_epoch, previous_step)


@pytest.fixture
def torn_model(settings, submitted):
    """A trained iris model whose registered checkpoint was cut short (sha256 updated to match)."""
    job_id = submitted({**SPEC, "name": "torn-model", "dataset": {"id": "builtin:iris"},
                        "hyperparameters": {"epochs": 1}})
    assert runner.run(job_id, 0, worker="inline", settings=settings) == "succeeded"
    with session_scope(settings.database_url) as s:
        job = s.get(Job, job_id)
        version = s.query(ModelVersion).filter_by(job_id=job_id).one()
        _truncate(settings, s, s.get(Checkpoint, version.checkpoint_id))
        return job.owner_id, f"{version.name}@{version.version}"


@pytest.mark.parametrize("kind", ["predict", "init_from"])
def test_a_truncated_model_checkpoint_fails_as_user_error_without_retries(settings, torn_model, kind):
    owner_id, ref = torn_model
    if kind == "predict":
        spec = {"kind": "predict", "model": ref, "inputs": [[5.1, 3.5, 1.4, 0.2]]}
    else:
        spec = {**SPEC, "name": "fine-tune", "dataset": {"id": "builtin:iris"}, "init_from": ref}
    with session_scope(settings.database_url) as s:
        owner = s.get(User, owner_id)
        job_id = service.submit(session=s, owner=owner, spec=parse_spec(spec), settings=settings).id
    assert runner.run(job_id, 0, worker="inline", settings=settings) == "failed"
    with session_scope(settings.database_url) as s:
        job = s.get(Job, job_id)
        assert job.state == "failed" and job.error_class == "user_error" and job.attempts == 1
        assert f"model {ref} cannot be loaded" in job.error_message and "does not parse" in job.error_message


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


def test_a_stop_right_after_a_periodic_checkpoint_keeps_both_files_and_resumes_from_it(
        settings, submitted, monkeypatch):
    # The stop checkpoint lands on the same epoch and step as the periodic one just written; each
    # must have its own file, or retention deleting the older row would delete the newer's file.
    job_id = submitted({**SPEC, "name": "stop-at-boundary", "checkpoint": {"every_epochs": 1, "keep_last": 1}})
    original = runner.Recorder.on_checkpoint

    def stop_after_epoch_2(self, epoch, step, data, **kwargs):
        original(self, epoch, step, data, **kwargs)
        if self.token == 1 and epoch == 2:
            self.request_stop("shutdown")

    monkeypatch.setattr(runner.Recorder, "on_checkpoint", stop_after_epoch_2)
    assert runner.run(job_id, 0, worker="inline", settings=settings) == "queued"
    with session_scope(settings.database_url) as s:
        rows = s.query(Checkpoint).filter_by(job_id=job_id).all()
        assert rows and len({r.path for r in rows}) == len(rows)
        for r in rows:
            assert storage.read_verified(settings.storage_root, r.path, r.sha256)
    assert runner.run(job_id, 1, worker="inline", settings=settings) == "succeeded"
    with session_scope(settings.database_url) as s:
        job = s.get(Job, job_id)
        assert job.resumed_from_epoch == 2 and job.result["epochs_completed"] == 5
        assert s.query(JobEvent).filter_by(job_id=job_id, kind="checkpoint_skipped").count() == 0


def test_a_spec_that_crashes_the_parser_fails_the_job_once_instead_of_looping(settings, submitted, monkeypatch):
    job_id = submitted({**SPEC, "name": "parser-crash", "hyperparameters": {"epochs": 1}})

    def broken(_raw):
        raise TypeError("a bug in a validator")

    monkeypatch.setattr(runner, "parse_spec", broken)
    assert runner.run(job_id, 0, worker="inline", settings=settings) == "failed"
    with session_scope(settings.database_url) as s:
        job = s.get(Job, job_id)
        assert job.state == "failed" and job.error_class == "internal" and job.attempts == 1
        assert "TypeError" in job.error_message and "a bug in a validator" not in job.error_message


def _trained_iris(settings, submitted, name: str) -> tuple[int, str, Checkpoint]:
    """A registered iris model: its owner's id, its ref, and its checkpoint row (detached)."""
    job_id = submitted({**SPEC, "name": name, "dataset": {"id": "builtin:iris"}, "hyperparameters": {"epochs": 1}})
    assert runner.run(job_id, 0, worker="inline", settings=settings) == "succeeded"
    with session_scope(settings.database_url) as s:
        version = s.query(ModelVersion).filter_by(job_id=job_id).one()
        ckpt = s.get(Checkpoint, version.checkpoint_id)
        s.expunge(ckpt)
        return s.get(Job, job_id).owner_id, f"{version.name}@{version.version}", ckpt


def _predict_job(settings, owner_id: int, ref: str) -> tuple[str, Job]:
    with session_scope(settings.database_url) as s:
        spec = parse_spec({"kind": "predict", "model": ref, "inputs": [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]})
        job_id = service.submit(session=s, owner=s.get(User, owner_id), spec=spec, settings=settings).id
    outcome = runner.run(job_id, 0, worker="inline", settings=settings)
    with session_scope(settings.database_url) as s:
        job = s.get(Job, job_id)
        s.expunge(job)
    return outcome, job


def test_a_cached_model_answers_without_reading_its_checkpoint_file(settings, submitted):
    from worker.ml import prediction

    prediction.clear_cache()
    owner_id, ref, ckpt = _trained_iris(settings, submitted, "warm-model")
    outcome, first = _predict_job(settings, owner_id, ref)
    assert outcome == "succeeded" and len(first.result["predictions"]) == 2
    # Garbage in place of the file: any read would fail its sha256 check.
    storage.resolve(settings.storage_root, ckpt.path).write_bytes(b"not a checkpoint")
    outcome, second = _predict_job(settings, owner_id, ref)
    assert outcome == "succeeded" and second.result["predictions"] == first.result["predictions"]

    # The same damage to a version never served from this process fails: the success above was the cache.
    cold_owner, cold_ref, cold = _trained_iris(settings, submitted, "cold-model")
    storage.resolve(settings.storage_root, cold.path).rename(
        storage.resolve(settings.storage_root, cold.path + ".moved"))
    outcome, failed = _predict_job(settings, cold_owner, cold_ref)
    assert outcome == "failed" and failed.error_class == "user_error"
    assert f"model {cold_ref} cannot be loaded" in failed.error_message
    prediction.clear_cache()


def test_an_attempt_records_the_kind_of_device_it_ran_on(settings, submitted):
    job_id = submitted({**SPEC, "name": "device-kind", "hyperparameters": {"epochs": 1},
                        "resources": {"device": "cpu"}})
    assert runner.run(job_id, 0, worker="inline", settings=settings) == "succeeded"
    with session_scope(settings.database_url) as s:
        assert s.query(Attempt).filter_by(job_id=job_id).one().device == "cpu"
