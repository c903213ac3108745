"""A long series is drawn from the curves kept as its reports arrive, the same as from the reports."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import func, select

from app.db import session_scope
from app.jobs import attempts, metric_curves
from app.models import Metric, MetricCurveChunk, utcnow
from tests.conftest import submit_unpublished

MLP = {"kind": "train", "name": "curves-mlp", "model": {"arch": "mlp"}, "dataset": {"id": "builtin:digits"},
       "hyperparameters": {"epochs": 1}}
STEPS = 2 * metric_curves.CHUNK_RECORDS + 300  # three chunks per step curve, the last one partly filled


def _reports(first: int, last: int) -> list[dict]:
    reports = []
    for step in range(first, last):
        values = {"loss": 2.0 / (1 + step) + (5.0 if step == 1234 else 0.0), "lr": 0.1 - step * 1e-5}
        if step % 10 == 0:
            values["grad_norm"] = None if step % 20 == 0 else float(step % 7)  # a gappy curve
        reports.append({"scope": "step", "epoch": step // 500, "step": step, "values": values,
                        "at": utcnow() - timedelta(seconds=STEPS - step)})
        if step % 500 == 499:
            reports.append({"scope": "epoch", "epoch": step // 500, "step": step,
                            "values": {"train_loss": 1.0 / (1 + step // 500)}, "at": utcnow()})
    return reports


def _record_run(settings, user_id: int) -> int:
    """A running job that reported STEPS steps in batches of uneven size, the way a recorder flushes."""
    job_id = submit_unpublished(settings, user_id, MLP)
    with session_scope(settings.database_url, write=True) as s:
        attempt = attempts.claim(session=s, job_id=job_id, token=0, worker="w", host="h", pid=1, lease_seconds=60)
        owner = attempts.lease_owner(attempt)
    start = 0
    for size in (1, 700, 1500, 47, STEPS):
        end = min(start + size, STEPS)
        with session_scope(settings.database_url, write=True) as s:
            attempts.record_batch(session=s, job_id=job_id, token=1, owner=owner, lease_seconds=60,
                                  metrics=_reports(start, end))
        start = end
    return job_id


def _assert_drawn(curve: dict, every: list[list], points: int, block: int) -> None:
    """``curve`` has at most ``points`` of ``every`` point, in order, and for each bucket of whole
    ``block``-point blocks (``points // 4`` about equal ones) its first, last, lowest and highest."""
    drawn = curve["points"]
    assert curve["count"] == len(every) and len(drawn) <= points
    assert [p[0] for p in drawn] == sorted({p[0] for p in drawn}) and all(p in every for p in drawn)
    n, buckets = len(every), points // 4
    bounds = [b * n // buckets for b in range(buckets + 1)]
    starts = range(0, n, block)
    edges = sorted({next(s for s in starts if s >= bound) for bound in bounds[:-1] if bound < n} | {n})
    for lo, hi in zip(edges, edges[1:]):
        part = every[lo:hi]
        low = min(part, key=lambda p: p[3])
        high = max(part, key=lambda p: p[3])
        for kept in (part[0], part[-1], low, high):
            assert kept in drawn, (lo, hi, kept)


def test_curves_are_chunked_as_reports_arrive_and_drawn_from_them(client, make_user, settings):
    user_id, token = make_user()
    auth = {"Authorization": f"Bearer {token}"}
    job_id = _record_run(settings, user_id)
    with session_scope(settings.database_url) as s:
        chunks = dict(s.execute(
            select(MetricCurveChunk.name, func.count()).where(MetricCurveChunk.job_id == job_id,
                                                              MetricCurveChunk.level == metric_curves.POINTS)
            .group_by(MetricCurveChunk.name)).all())
    assert chunks == {"loss": 3, "lr": 3, "grad_norm": 1, "train_loss": 1}

    def series(query: str) -> dict[str, dict]:
        r = client.get(f"/api/v1/jobs/{job_id}/metrics?{query}", headers=auth)
        assert r.status_code == 200, r.get_data(as_text=True)
        return {c["name"]: c for c in r.get_json()["series"]}

    every = series("scope=step&points=10000")  # short enough: every point, in order
    assert [p[2] for p in every["lr"]["points"]] == list(range(STEPS))
    assert every["grad_norm"]["count"] == len(range(10, STEPS, 20))  # nulls are gaps, not points
    # Where a bucket holds fewer than a block's worth, the points are read: the same as from the reports
    # (an explicit limit reads the reports themselves).
    for query in ("scope=step&points=10000", "scope=step&points=2000", "points=2000", "scope=epoch&points=8"):
        assert series(query) == series(query + "&limit=100000"), query
    # Longer ones are drawn from the block summaries: bucket edges on block edges.
    for wanted in (200, 60, 8):
        drawn = series(f"scope=step&points={wanted}")
        assert set(drawn) == {"loss", "lr", "grad_norm"}
        for name in ("loss", "lr"):
            _assert_drawn(drawn[name], every[name]["points"], wanted, metric_curves.BLOCK)
        assert drawn["loss"]["points"][0][2] == 0 and drawn["loss"]["points"][-1][2] == STEPS - 1
    assert [p[3] for p in series("scope=step&points=200")["loss"]["points"] if p[2] == 1234] == [5.0 + 2.0 / 1235]

    # Reports stored without folding (an older job, another writer) are read from the reports.
    with session_scope(settings.database_url) as s:
        s.add(Metric(job_id=job_id, attempt=1, scope="step", epoch=9, step=STEPS, values={"loss": -1.0}))
    whole = series("scope=step&points=10000")["loss"]["points"]
    assert len(whole) == STEPS + 1 and whole[-1][2:] == [STEPS, -1.0]
    _assert_drawn(series("scope=step&points=200")["loss"], whole, 200, metric_curves.BLOCK)
    assert series("scope=step&points=2000") == series("scope=step&points=2000&limit=100000")
    # The next fold takes that report into the curve, after the ones it already holds.
    with session_scope(settings.database_url, write=True) as s:
        metric_curves.fold(session=s, job_id=job_id)
        assert s.execute(select(func.max(MetricCurveChunk.total)).where(MetricCurveChunk.job_id == job_id)
                         ).scalar_one() == STEPS + 1
    assert series("scope=step&points=10000")["loss"]["points"] == whole
    _assert_drawn(series("scope=step&points=200")["loss"], whole, 200, metric_curves.BLOCK)
