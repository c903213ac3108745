"""Each metric's curve of a job, kept in packed chunks beside its reports, and drawn downsampled.

A report (a ``metrics`` row) holds several named values; a curve is one (scope, name) pair's values
in report order. :func:`fold` appends the reports no chunk covers yet to their curves, in a fenced
transaction of the attempt that stores reports (``app.jobs.attempts``; a worker folds every few
hundred reports or seconds and in its final transaction), at two levels: every point, and one summary
per block of :data:`BLOCK` points (its first, last, lowest and highest point). :func:`read` draws a
job's curves from the summaries when a curve is long enough that a bucket spans whole blocks, else
from the points, and takes any report after the chunks' ``covered_id`` from ``metrics``: reports
stored some other way, or before chunks existed, are never missed, only slower to read.

Downsampling keeps, for each of ``points // 4`` buckets of consecutive points, its first, last,
lowest and highest point, so spikes and both ends survive; from the summaries a bucket's edges fall
on block edges.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import Text, and_, bindparam, cast, func, insert, select, tuple_, update
from sqlalchemy.orm import Session

from app.db import json_loads
from app.models import Metric, MetricCurveChunk

# One point of a curve: the report's id, epoch and step, and the value.
POINT = np.dtype([("id", "<i4"), ("epoch", "<i4"), ("step", "<i8"), ("value", "<f8")])
CHUNK_RECORDS = 1024  # records per chunk (24 KB): a fold rewrites at most the last chunk of each level
BLOCK = 32  # points per summary block; divides CHUNK_RECORDS, so a block never spans two chunks
POINTS, SUMMARIES = 0, 1  # levels: every point; four records (first, last, lowest, highest) per block
_EMPTY = np.empty(0, dtype=POINT)


@dataclass
class Curve:
    """One metric's curve: ``count`` points in all, of which ``points`` (:data:`POINT` records, in
    report order) are drawn."""

    scope: str
    name: str
    count: int
    points: np.ndarray


def _buckets(starts: np.ndarray, n: int, buckets: int, lows: np.ndarray, highs: np.ndarray):
    """For units (points or blocks) beginning at positions ``starts`` of an ``n``-point curve cut into
    ``buckets`` equal buckets: each bucket's first and last unit, and the unit with its lowest and
    highest value (the first of equal ones)."""
    bounds = np.arange(buckets + 1, dtype=np.int64) * n // buckets
    bucket = np.searchsorted(bounds, starts, side="right") - 1
    first = np.flatnonzero(np.r_[True, bucket[1:] != bucket[:-1]])
    last = np.r_[first[1:], len(starts)] - 1
    sizes = last - first + 1
    at_low = np.flatnonzero(lows == np.repeat(np.minimum.reduceat(lows, first), sizes))
    at_high = np.flatnonzero(highs == np.repeat(np.maximum.reduceat(highs, first), sizes))
    return first, last, at_low[np.searchsorted(at_low, first)], at_high[np.searchsorted(at_high, first)]


def downsample(values: Sequence[float], points: int) -> list[int]:
    """Indices of ``values`` to draw with at most ``points`` (>= 4) points: the series is cut into
    ``points // 4`` equal buckets and each keeps its first, last, smallest and largest value.
    Returns every index when the series is short enough."""
    n = len(values)
    if n <= points:
        return list(range(n))
    ys = np.asarray(values, dtype=np.float64)
    first, last, low, high = _buckets(np.arange(n), n, max(1, points // 4), ys, ys)
    return np.unique(np.concatenate([first, last, low, high])).tolist()


def _from_summaries(blocks: np.ndarray, starts: np.ndarray, n: int, points: int) -> np.ndarray:
    """Downsample from units of four records (first, last, lowest, highest) beginning at ``starts``."""
    first, last, low, high = _buckets(starts, n, max(1, points // 4), blocks[:, 2]["value"], blocks[:, 3]["value"])
    records = np.concatenate([blocks[first, 0], blocks[last, 1], blocks[low, 2], blocks[high, 3]])
    _, keep = np.unique(records["id"], return_index=True)  # sorted by id: report order
    return records[keep]


def _summaries(points: np.ndarray) -> np.ndarray:
    """Four records per block of BLOCK points (the last block may be shorter), flattened."""
    out = np.empty(4 * math.ceil(len(points) / BLOCK), dtype=POINT)
    for k, start in enumerate(range(0, len(points), BLOCK)):
        block = points[start:start + BLOCK]
        values = block["value"]
        out[4 * k:4 * k + 4] = block[[0, -1, int(values.argmin()), int(values.argmax())]]
    return out


def _joined(*parts: np.ndarray) -> np.ndarray:
    # np.concatenate of structured arrays promotes their fields at every call: copy into one instead.
    out = np.empty(sum(len(p) for p in parts), dtype=POINT)
    at = 0
    for part in parts:
        out[at:at + len(part)] = part
        at += len(part)
    return out


_NUMBERS = (float, int)  # exact types: a bool is not a point


def points_of(rows: Iterable[Sequence[Any]]) -> dict[tuple[str, str], list[tuple]]:
    """The points of each (scope, name) in rows of (id, scope, epoch, step, values), in row order;
    a report without a finite number for a name is a gap in that curve."""
    curves: dict[tuple[str, str], list[tuple]] = {}
    finite, numbers = math.isfinite, _NUMBERS
    for id_, scope, epoch, step, values in rows:
        if not values:
            continue
        for name, value in values.items():
            if type(value) in numbers and finite(value):
                points = curves.get((scope, name))
                if points is None:
                    points = curves[scope, name] = []
                points.append((id_, epoch, step, value))
    return curves


def _parsed(rows: Iterable[Sequence[Any]]):
    # Reports read with their values as stored text (see _report_rows), parsed here in one step.
    for id_, scope, epoch, step, text in rows:
        yield id_, scope, epoch, step, json_loads(text)


def _in_order(curves: list[Curve]) -> list[Curve]:
    # By first report, then name: the same order whichever way the curves were read.
    return sorted(curves, key=lambda c: (int(c.points["id"][0]), c.scope, c.name))


def _drawn(scope: str, name: str, points: np.ndarray, wanted: int) -> Curve:
    return Curve(scope, name, len(points), points[downsample(points["value"], wanted)])


def curves_of(rows: Iterable[Sequence[Any]], points: int) -> list[Curve]:
    """The curves of rows of (id, scope, epoch, step, values), each downsampled to ``points``."""
    return _in_order([_drawn(scope, name, np.array(found, dtype=POINT), points)
                      for (scope, name), found in points_of(rows).items()])


def _report_rows(job_id: int, after: int, scope: str | None = None):
    stmt = (select(Metric.id, Metric.scope, Metric.epoch, Metric.step, cast(Metric.values, Text))
            .where(Metric.job_id == job_id, Metric.id > after).order_by(Metric.id))
    return stmt.where(Metric.scope == scope) if scope else stmt


def _chunks(key: tuple[str, str, int], head, keep: int, records: np.ndarray, total: int, covered: int):
    """The chunk rows that replace a level's records after the first ``keep`` of its last chunk
    ``head`` with ``records``; each is (whether it exists already, its values)."""
    scope, name, level = key
    number, kept = 0, _EMPTY
    if head is not None:
        number, kept = (head.chunk + 1, _EMPTY) if keep == CHUNK_RECORDS else (
            head.chunk, np.frombuffer(head.points, dtype=POINT)[:keep])
    data = _joined(kept, records)
    for start in range(0, len(data), CHUNK_RECORDS):
        part = data[start:start + CHUNK_RECORDS]
        yield head is not None and number == head.chunk, {
            "c_scope": scope, "c_name": name, "c_level": level, "c_chunk": number, "count": len(part),
            "total": total, "covered_id": covered, "points": part.tobytes()}
        number += 1


_chunk = MetricCurveChunk
_UPDATE_CHUNK = (update(_chunk).where(_chunk.job_id == bindparam("c_job"), _chunk.scope == bindparam("c_scope"),
                                      _chunk.name == bindparam("c_name"), _chunk.level == bindparam("c_level"),
                                      _chunk.chunk == bindparam("c_chunk")))
_INSERT_CHUNK = insert(_chunk).values(job_id=bindparam("c_job"), scope=bindparam("c_scope"), name=bindparam("c_name"),
                                      level=bindparam("c_level"), chunk=bindparam("c_chunk"))


def fold(*, session: Session, job_id: int) -> None:
    """Append the job's reports that no chunk covers yet to their curves; call it in a fenced
    transaction of the attempt (the job's lease renewal, or its final compare-and-set, serialises
    it with any other writer)."""
    chunk = MetricCurveChunk
    newest = (select(chunk.scope, chunk.name, chunk.level, func.max(chunk.chunk).label("chunk"))
              .where(chunk.job_id == job_id).group_by(chunk.scope, chunk.name, chunk.level).subquery())
    # The last chunk of each curve and level; the newest fold wrote some of them, so they hold the newest covered_id.
    heads = {(r.scope, r.name, r.level): r for r in session.execute(
        select(chunk.scope, chunk.name, chunk.level, chunk.chunk, chunk.count, chunk.total, chunk.covered_id,
               chunk.points)
        .join(newest, and_(chunk.job_id == job_id, chunk.scope == newest.c.scope, chunk.name == newest.c.name,
                           chunk.level == newest.c.level, chunk.chunk == newest.c.chunk)))}
    covered = max((h.covered_id for h in heads.values()), default=0)
    rows = list(_parsed(session.connection().execute(_report_rows(job_id, covered)).all()))
    if not rows:
        return
    covered = rows[-1][0]
    writes: dict[bool, list[dict]] = {True: [], False: []}  # rewritten chunks, new chunks
    for (scope, name), found in points_of(rows).items():
        new = np.array(found, dtype=POINT)
        head = heads.get((scope, name, POINTS))
        stored = head.total if head is not None else 0
        last_chunk = np.frombuffer(head.points, dtype=POINT) if head is not None else _EMPTY
        total = stored + len(new)
        for exists, values in _chunks((scope, name, POINTS), head, len(last_chunk), new, total, covered):
            writes[exists].append(values)
        # Summaries from the block the new points begin in (its earlier points are in the last chunk).
        block = stored // BLOCK
        earlier = last_chunk[block * BLOCK - head.chunk * CHUNK_RECORDS:] if head is not None else _EMPTY
        summaries = _summaries(_joined(earlier, new))
        summary_head = heads.get((scope, name, SUMMARIES))
        keep = 4 * block - summary_head.chunk * CHUNK_RECORDS if summary_head is not None else 0
        for exists, values in _chunks((scope, name, SUMMARIES), summary_head, keep, summaries, total, covered):
            writes[exists].append(values)
    connection = session.connection()
    for exists, statement in ((True, _UPDATE_CHUNK), (False, _INSERT_CHUNK)):
        if writes[exists]:
            connection.execute(statement, [dict(values, c_job=job_id) for values in writes[exists]])


def read(*, session: Session, job_id: int, points: int, scope: str | None = None) -> list[Curve]:
    """The job's curves (of ``scope``, or all), each downsampled to at most ``points`` points."""
    chunk = MetricCurveChunk
    buckets = max(1, points // 4)
    stmt = (select(chunk.scope, chunk.name, chunk.total, chunk.covered_id, chunk.points)
            .where(chunk.job_id == job_id, chunk.level == SUMMARIES).order_by(chunk.scope, chunk.name, chunk.chunk))
    if scope:
        stmt = stmt.where(chunk.scope == scope)
    summaries: dict[tuple[str, str], list[bytes]] = {}
    totals: dict[tuple[str, str], int] = {}
    covered = 0
    # covered_id is read in the same statement as the chunks: the reports after it are exactly those
    # that no chunk of this snapshot holds.
    connection = session.connection()
    for row in connection.execute(stmt):
        summaries.setdefault((row.scope, row.name), []).append(row.points)
        totals[row.scope, row.name] = max(totals.get((row.scope, row.name), 0), row.total)
        covered = max(covered, row.covered_id)
    later = {key: np.array(found, dtype=POINT)
             for key, found in points_of(_parsed(
                 connection.execute(_report_rows(job_id, covered, scope)).all())).items()}
    # A curve too short for a bucket to span whole blocks is drawn from its points.
    short = {key for key, total in totals.items() if total <= BLOCK * buckets}
    stored: dict[tuple[str, str], list[bytes]] = {}
    if short:
        for row in connection.execute(
                select(chunk.scope, chunk.name, chunk.points)
                .where(chunk.job_id == job_id, chunk.level == POINTS,
                       tuple_(chunk.scope, chunk.name).in_(sorted(short)))
                .order_by(chunk.scope, chunk.name, chunk.chunk)):
            stored.setdefault((row.scope, row.name), []).append(row.points)
    curves = []
    for key in totals.keys() | later.keys():
        total, tail = totals.get(key, 0), later.get(key, _EMPTY)
        if key in totals and key not in short:
            blocks = np.frombuffer(b"".join(summaries[key]), dtype=POINT).reshape(-1, 4)
            starts = np.arange(len(blocks), dtype=np.int64) * BLOCK
            if len(tail):  # later points are blocks of one
                blocks = _joined(blocks.ravel(), np.repeat(tail, 4)).reshape(-1, 4)
                starts = np.concatenate([starts, total + np.arange(len(tail))])
            curves.append(Curve(*key, total + len(tail), _from_summaries(blocks, starts, total + len(tail), points)))
        else:
            # A later fold may have added points since the summaries were read: keep the first ``total``.
            every = np.frombuffer(b"".join(stored.get(key, [])), dtype=POINT)[:total]
            curves.append(_drawn(*key, _joined(every, tail), points))
    return _in_order(curves)
