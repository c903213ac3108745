"""Orphaned checkpoint files are swept; recorded ones and fresh ones are kept."""

from __future__ import annotations

import os
import time

from app.accounts import create_user
from app.jobs.storage_gc import sweep_orphans
from app.models import Checkpoint, Job


def test_sweep_removes_only_old_unrecorded_files(session, tmp_path):
    user, _ = create_user(session=session, email="gc@example.com")
    job = Job(owner_id=user.id, kind="train", name="gc", state="running", queue="train", spec={})
    session.add(job)
    session.flush()
    folder = tmp_path / "jobs" / str(job.id) / "checkpoints"
    folder.mkdir(parents=True)
    names = {"kept": "a1-e00001-s000000010.safetensors", "orphan": "a1-e00002-s000000020.safetensors",
             "tmp": ".tmp-abc.safetensors", "fresh": "a2-e00003-s000000030.safetensors"}
    for name in names.values():
        (folder / name).write_bytes(b"x")
    old = time.time() - 7200
    for key in ("kept", "orphan", "tmp"):
        os.utime(folder / names[key], (old, old))
    session.add(Checkpoint(job_id=job.id, attempt=1, epoch=1, step=10, size_bytes=1, sha256="0" * 64,
                           path=f"jobs/{job.id}/checkpoints/{names['kept']}"))
    session.flush()
    removed = sweep_orphans(session=session, root=tmp_path, older_than_seconds=3600)
    assert sorted(removed) == sorted(f"jobs/{job.id}/checkpoints/{names[k]}" for k in ("orphan", "tmp"))
    assert sorted(p.name for p in folder.iterdir()) == sorted([names["kept"], names["fresh"]])
