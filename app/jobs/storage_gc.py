"""Storage garbage collection: checkpoint files that no row points to.

A worker killed between writing a checkpoint and recording it, or a stale attempt killed before it
removed a refused file, leaves files behind. The reaper sweeps them once they are old enough that
no live attempt can still be about to record them.
"""

from __future__ import annotations

import time
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import Checkpoint


def sweep_orphans(*, session: Session, root: Path, older_than_seconds: float) -> list[str]:
    """Delete checkpoint files (and temporary files) with no row, older than the given age."""
    jobs_dir = Path(root) / "jobs"
    if not jobs_dir.is_dir():
        return []
    cutoff = time.time() - older_than_seconds
    known = set(session.execute(select(Checkpoint.path)).scalars())
    removed = []
    for path in jobs_dir.glob("*/checkpoints/*"):
        relative = path.relative_to(root).as_posix()
        if relative in known or not path.is_file():
            continue
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
                removed.append(relative)
        except FileNotFoundError:
            continue
    return removed
