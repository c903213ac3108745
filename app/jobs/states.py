"""The job state machine: the table of allowed transitions and the only writer of ``Job.state``.

Every transition is one conditional UPDATE (compare-and-set on the current state and, where
given, the fencing token), so two writers can never both win; each records a ``JobEvent``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import (JSON, Boolean, Integer, Text, bindparam, case, cast, func, insert, literal, null, select,
                        tuple_, union_all, update)
from sqlalchemy.sql.elements import ClauseElement
from sqlalchemy.sql.selectable import CTE
from sqlalchemy.orm import Session

from app import webhooks
from app.models import Job, JobEvent, utcnow

QUEUED = "queued"
RUNNING = "running"
PAUSED = "paused"
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLED = "cancelled"

STATES = (QUEUED, RUNNING, PAUSED, SUCCEEDED, FAILED, CANCELLED)
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})

TRANSITIONS: dict[str, frozenset[str]] = {
    QUEUED: frozenset({RUNNING, CANCELLED, FAILED, PAUSED}),
    RUNNING: frozenset({SUCCEEDED, FAILED, CANCELLED, QUEUED, PAUSED}),
    PAUSED: frozenset({QUEUED, CANCELLED}),
    SUCCEEDED: frozenset(),
    FAILED: frozenset({QUEUED}),
    CANCELLED: frozenset({QUEUED}),
}


_INSERT_EVENT = insert(JobEvent.__table__)


class InvalidTransition(ValueError):
    """A transition the table does not allow."""


def allowed(from_state: str, to_state: str) -> bool:
    """Whether the table allows ``from_state -> to_state``."""
    return to_state in TRANSITIONS.get(from_state, frozenset())


@dataclass(frozen=True)
class Move:
    """One job of :func:`transition_all`: its id, fencing token (None: not checked), the column
    values of its own (plain values, bound per job), and its event's message and data."""

    job_id: int
    token: int | None = None
    values: dict[str, Any] = field(default_factory=dict)
    message: str | None = None
    data: dict[str, Any] | None = None


@dataclass(frozen=True)
class Moved:
    """A move that won: the state the job left, its attempt number after the change and its owner."""

    move: Move
    from_state: str
    attempt: int
    owner_id: int


def transition(
    session: Session,
    job_id: int,
    *,
    to: str,
    expect: str | tuple[str, ...],
    token: int | None = None,
    values: dict[str, Any] | None = None,
    event: str = "state",
    message: str | None = None,
    data: dict[str, Any] | None = None,
) -> bool:
    """Move a job to ``to`` if it is in ``expect`` (and holds ``token``); False if another won.

    ``values`` are extra column updates applied in the same statement (SQL expressions allowed).
    The caller owns the transaction.
    """
    move = Move(job_id, token, message=message, data=data)
    return bool(transition_all(session, [move], to=to, expect=expect, values=values, event=event))


def transition_all(
    session: Session,
    moves: Sequence[Move],
    *,
    to: str,
    expect: str | tuple[str, ...],
    values: dict[str, Any] | None = None,
    event: str = "state",
    where: Sequence[Any] = (),
    params: dict[str, Any] | None = None,
    shape: str | None = None,
) -> list[Moved]:
    """Move each job of ``moves`` to ``to`` if it is in ``expect`` (and holds its token), one
    compare-and-set each, in the caller's transaction; returns the moves that won.

    ``values`` are column updates shared by every move (SQL expressions allowed), applied in the
    same statements as each move's own ``values``; ``where`` are further conditions every job must
    meet. A move that loses changes nothing of its job.

    ``shape`` names the form of ``values``' expressions and of ``where`` for a caller whose
    expressions carry no value of their own (each is a ``bindparam`` whose value is in ``params``):
    its statements are then built once per process, not per call. Plain values are always bound.
    """
    expected = (expect,) if isinstance(expect, str) else tuple(expect)
    now, shared, binds, cacheable = _bound(values, params, shape, where)
    # The conditional UPDATE is the only guard, with no read before it: whatever a writer saw
    # earlier, only one UPDATE can match the row in a given state (and with the fencing token).
    # One statement per allowed source state, so the event knows which state the job left; it
    # returns what the event and the outbox need. Core statements, each built once per process for
    # its shape: no ORM bookkeeping per change. After a flush, so that what the caller added to
    # the session is written first, as before.
    session.flush()
    conn = session.connection()
    won: list[tuple[Moved, Any]] = []
    pending = list(moves)
    statements = _STATEMENTS if cacheable else {}
    for current in (s for s in expected if allowed(s, to)):
        left = []
        for move in pending:
            key = (shape, current, to, move.token is None, tuple(move.values), tuple(shared))
            stmt = statements.get(key)
            if stmt is None:
                stmt = statements[key] = _compare_and_set(current, to, move, shared, where)
            row = conn.execute(stmt, {"kiln_job_id": move.job_id, "kiln_token": move.token, **binds,
                                      **{f"kiln_value_{k}": v for k, v in move.values.items()}}).first()
            if row is None:
                left.append(move)
            else:
                won.append((Moved(move, current, row.attempts, row.owner_id), row.webhook))
        pending = left
        if not pending:
            break
    if pending and not all(allowed(s, to) for s in expected):
        found = dict(conn.execute(select(Job.id, Job.state).where(Job.id.in_([m.job_id for m in pending]))).all())
        for move in pending:
            current = found.get(move.job_id)
            if current in expected and not allowed(current, to):
                raise InvalidTransition(f"{current} -> {to} is not a job transition")
    if won:
        conn.execute(_INSERT_EVENT, [
            dict(job_id=m.move.job_id, at=now, kind=event, from_state=m.from_state, to_state=to,
                 attempt=m.attempt or None, message=m.move.message, data=m.move.data) for m, _ in won])
    for m, webhook in won:
        # The outbox row, in this transaction: committed with the event or not at all.
        webhooks.record_transition(session=session, job_id=m.move.job_id, webhook=webhook, to=to,
                                   from_state=m.from_state, attempt=m.attempt or None, message=m.move.message)
    return [m for m, _ in won]


# The compare-and-set statements of this process, by shape (at most a few dozen: one per caller,
# source state, target state and set of columns).
_STATEMENTS: dict[tuple, Any] = {}


def _bound(values, params, shape, where) -> tuple[Any, dict[str, Any], dict[str, Any], bool]:
    """A move's time, its shared values, their binds (plain values bound, expressions kept), and
    whether its statements may be cached: without a shape, an expression may hold a literal of this
    call, so its statements are built for it alone."""
    now = utcnow()
    shared = dict(values or {})
    binds: dict[str, Any] = {"kiln_now": now, **(params or {})}
    for key, value in shared.items():
        if not isinstance(value, ClauseElement):
            binds[f"kiln_shared_{key}"] = value
    cacheable = shape is not None or not any(isinstance(v, ClauseElement) for v in shared.values()) and not where
    return now, shared, binds, cacheable


def _changes(to: str, shared: dict[str, Any]) -> dict[str, Any]:
    """The columns a move to ``to`` sets (state, times, lease) and the call's shared values, all bound."""
    table = Job.__table__
    at = bindparam("kiln_now", type_=table.c.updated_at.type)
    changes: dict[str, Any] = {"state": to, "updated_at": at}
    if to in TERMINAL:
        changes.update(finished_at=at, lease_owner=None, lease_expires_at=None)
    elif to == QUEUED:
        changes.update(queued_at=at, lease_owner=None, lease_expires_at=None, finished_at=None)
    elif to == PAUSED:
        changes.update(lease_owner=None, lease_expires_at=None)
    for key, value in shared.items():
        changes[key] = value if isinstance(value, ClauseElement) else bindparam(f"kiln_shared_{key}",
                                                                                 type_=table.c[key].type)
    return changes


def _compare_and_set(current: str, to: str, move: Move, shared: dict[str, Any], where: Sequence[Any]):
    """``UPDATE jobs SET <the transition's columns, shared values and the move's own> WHERE id, state
    (and token) RETURNING``; every value of a call is a bound parameter."""
    table = Job.__table__
    changes = _changes(to, shared)
    stmt = update(table).where(table.c.id == bindparam("kiln_job_id"), table.c.state == current, *where)
    if move.token is not None:
        stmt = stmt.where(table.c.attempts == bindparam("kiln_token"))
    own = {k: bindparam(f"kiln_value_{k}", type_=table.c[k].type) for k in move.values}
    return stmt.values({**changes, **own}).returning(table.c.attempts, table.c.webhook, table.c.owner_id)


def transition_batch(
    session: Session,
    moves: Sequence[Move],
    *,
    to: str,
    expect: str,
    values: dict[str, Any] | None = None,
    event: str = "state",
    where: Sequence[Any] = (),
    params: dict[str, Any] | None = None,
    shape: str | None = None,
    also: dict[int, dict[str, Any]] | None = None,
    follow: Callable[[CTE], list[CTE]] | None = None,
) -> list[Moved]:
    """:func:`transition_all` for a batch of moves that each carry their fencing token, in one
    statement for all of them: ``UPDATE jobs SET … WHERE (id, attempts) IN ((id, token), …) AND
    state = expect … RETURNING``. Still a compare-and-set per row: a row matches only with its own
    token and in ``expect``, and a move that loses changes nothing of its job.

    ``values`` are shared by every move (SQL expressions of the row allowed, such as
    ``attempts + 1``); each move's own ``values`` are written by one more statement (an
    ``executemany``) for the moves that won, whose rows this transaction now holds. ``shape`` as in
    :func:`transition_all`: with it, the statements are built once per process. ``also``: one more
    event (kind, message, data) by job id, written after its state event in the same INSERT if, and
    only if, its job moved.

    On PostgreSQL all of it is one statement (:func:`_batch_in_one_statement`): the compare-and-set
    with each move's own values, and the events as a data-modifying CTE. ``follow`` (PostgreSQL
    only; built once per process with the statement, so it must bind every value it uses, through
    ``params``) adds the caller's own data-modifying CTEs over the moved rows (``id``, ``attempts``,
    ``owner_id``): an attempt's row or end, usage totals.
    """
    if not moves:
        return []
    if not allowed(expect, to):
        raise InvalidTransition(f"{expect} -> {to} is not a job transition")
    if any(m.token is None for m in moves):
        raise ValueError("transition_batch needs every move's fencing token")
    now, shared, binds, cacheable = _bound(values, params, shape, where)
    statements = _STATEMENTS if cacheable else {}
    session.flush()
    conn = session.connection()
    if conn.dialect.name == "postgresql":
        won = _batch_in_one_statement(conn, statements, moves, to=to, expect=expect, shared=shared, binds=binds,
                                      event=event, where=where, shape=shape, also=also, follow=follow)
        for m, webhook in won:
            webhooks.record_transition(session=session, job_id=m.move.job_id, webhook=webhook, to=to,
                                       from_state=m.from_state, attempt=m.attempt or None, message=m.move.message)
        return [m for m, _ in won]
    if len(moves) == 1:
        # A lone move (an inline prediction's claim or finish): its own columns go in its
        # compare-and-set, one statement (``WHERE id = … AND attempts = …``).
        move = moves[0]
        key = ("one", shape, expect, to, tuple(move.values), tuple(shared))
        stmt = statements.get(key)
        if stmt is None:
            stmt = statements[key] = _compare_and_set(expect, to, move, shared, where)
        row = conn.execute(stmt, {"kiln_job_id": move.job_id, "kiln_token": move.token, **binds,
                                  **{f"kiln_value_{k}": v for k, v in move.values.items()}}).first()
        won = [] if row is None else [(Moved(move, expect, row.attempts, row.owner_id), row.webhook)]
        own_keys: set[tuple[str, ...]] = set()
    else:
        key = ("batch", shape, expect, to, tuple(shared))
        stmt = statements.get(key)
        if stmt is None:
            stmt = statements[key] = _compare_and_set_batch(expect, to, shared, where)
        rows = conn.execute(stmt, {"kiln_pairs": [(m.job_id, m.token) for m in moves], **binds}).all()
        returned = {row.id: row for row in rows}
        won = [(Moved(m, expect, returned[m.job_id].attempts, returned[m.job_id].owner_id),
                returned[m.job_id].webhook) for m in moves if m.job_id in returned]
        own_keys = {tuple(m.move.values) for m, _ in won}
    for keys in own_keys:  # each move's own columns, for the moves that won (usually one shape)
        if not keys:
            continue
        own = _STATEMENTS.get(("batch-own", keys))
        if own is None:
            own = _STATEMENTS[("batch-own", keys)] = _own_values(keys)
        conn.execute(own, [{"kiln_job_id": m.move.job_id, **{f"kiln_value_{k}": v for k, v in m.move.values.items()}}
                           for m, _ in won if tuple(m.move.values) == keys])
    if won:
        rows = []
        for m, _ in won:
            rows.append(dict(job_id=m.move.job_id, at=now, kind=event, from_state=m.from_state, to_state=to,
                             attempt=m.attempt or None, message=m.move.message, data=m.move.data))
            extra = also.get(m.move.job_id) if also else None
            if extra is not None:
                rows.append(dict(job_id=m.move.job_id, at=now, kind=extra["kind"], from_state=None, to_state=None,
                                 attempt=m.attempt or None, message=extra.get("message"), data=extra.get("data")))
        conn.execute(_INSERT_EVENT, rows)
    for m, webhook in won:
        webhooks.record_transition(session=session, job_id=m.move.job_id, webhook=webhook, to=to,
                                   from_state=m.from_state, attempt=m.attempt or None, message=m.move.message)
    return [m for m, _ in won]


def _compare_and_set_batch(current: str, to: str, shared: dict[str, Any], where: Sequence[Any]):
    """The one statement of :func:`transition_batch`; every value of a call is a bound parameter."""
    table = Job.__table__
    changes = _changes(to, shared)
    pairs = tuple_(table.c.id, table.c.attempts).in_(bindparam("kiln_pairs", expanding=True))
    return (update(table).where(pairs, table.c.state == current, *where).values(changes)
            .returning(table.c.id, table.c.attempts, table.c.webhook, table.c.owner_id))


def _own_values(keys: tuple[str, ...]):
    """``UPDATE jobs SET <keys> WHERE id`` for :func:`transition_batch`'s per-move columns (executemany)."""
    table = Job.__table__
    return (update(table).where(table.c.id == bindparam("kiln_job_id"))
            .values({k: bindparam(f"kiln_value_{k}", type_=table.c[k].type) for k in keys}))


def _batch_in_one_statement(conn, statements: dict, moves: Sequence[Move], *, to: str, expect: str,
                            shared: dict[str, Any], binds: dict[str, Any], event: str, where: Sequence[Any],
                            shape: str | None, also: dict[int, dict[str, Any]] | None,
                            follow: Callable[[CTE], list[CTE]] | None) -> list[tuple[Moved, Any]]:
    """PostgreSQL's :func:`transition_batch`: one round trip for the batch, whatever its size.

    Every move's id, token, own values and event texts go in as arrays (one bound parameter each,
    so the statement is built once per shape): ``WITH kiln_moves AS (SELECT unnest(ids), unnest(tokens), …),
    kiln_moved AS (UPDATE jobs SET … FROM kiln_moves WHERE jobs.id = kiln_moves.id AND jobs.attempts =
    kiln_moves.token AND state = expect … RETURNING …), kiln_events AS (INSERT INTO job_events …
    SELECT … FROM kiln_moved) SELECT … FROM kiln_moved``. Still a compare-and-set per row: a row
    matches only on its own id, token and state, and a move that loses changes nothing of its job.
    """
    keys = sorted({k for m in moves for k in m.values})
    own = tuple((k, not all(k in m.values for m in moves)) for k in keys)  # (column, not every move sets it)
    key = ("pg-batch", shape, expect, to, event, tuple(shared), own, follow)
    stmt = statements.get(key)
    if stmt is None:
        stmt = statements[key] = _one_statement(expect, to, event, shared, where, own, follow)
    extra = [also.get(m.job_id) if also else None for m in moves]
    params: dict[str, Any] = {
        **binds, "kiln_ids": [m.job_id for m in moves], "kiln_tokens": [m.token for m in moves],
        "kiln_ord": list(range(len(moves))), "kiln_messages": [m.message for m in moves],
        "kiln_data": [_json_text(m.data) for m in moves],
        "kiln_also_kinds": [e["kind"] if e else None for e in extra],
        "kiln_also_messages": [e.get("message") if e else None for e in extra],
        "kiln_also_data": [_json_text(e.get("data")) if e else None for e in extra],
    }
    for column, partial in own:
        kind = Job.__table__.c[column].type
        params[f"kiln_own_{column}"] = [_array_item(kind, m.values[column]) if column in m.values else None
                                        for m in moves]
        if partial:
            params[f"kiln_has_{column}"] = [column in m.values for m in moves]
    rows = sorted(conn.execute(stmt, params).all(), key=lambda row: row.ord)
    return [(Moved(moves[row.ord], expect, row.attempts, row.owner_id), row.webhook) for row in rows]


def _array_item(kind: Any, value: Any) -> Any:
    """A move's own value as bound in its column's array: a JSON column's as text (its None is JSON
    null, or SQL NULL where the column stores it so, as SQLAlchemy writes them)."""
    if not isinstance(kind, JSON):
        return value
    return None if value is None and kind.none_as_null else json.dumps(value)


def _json_text(value: Any) -> str | None:
    """A JSON column's value as the text bound for it in an array (None: SQL NULL)."""
    return None if value is None else json.dumps(value)


def _one_statement(current: str, to: str, event: str, shared: dict[str, Any], where: Sequence[Any],
                   own: tuple[tuple[str, bool], ...], follow: Callable[[CTE], list[CTE]] | None):
    """The statement of :func:`_batch_in_one_statement`; every value of a call is a bound parameter."""
    from sqlalchemy.dialects.postgresql import ARRAY

    table = Job.__table__

    def unnest(name: str, item_type: Any):
        return func.unnest(bindparam(name, type_=ARRAY(item_type)))

    columns = [unnest("kiln_ids", table.c.id.type).label("id"), unnest("kiln_tokens", table.c.attempts.type).label("token"),
               unnest("kiln_ord", Integer()).label("ord"), unnest("kiln_messages", Text()).label("message"),
               unnest("kiln_data", Text()).label("data"), unnest("kiln_also_kinds", Text()).label("also_kind"),
               unnest("kiln_also_messages", Text()).label("also_message"),
               unnest("kiln_also_data", Text()).label("also_data")]
    for column, partial in own:
        is_json = isinstance(table.c[column].type, JSON)
        columns.append(unnest(f"kiln_own_{column}", Text() if is_json else table.c[column].type).label(f"own_{column}"))
        if partial:
            columns.append(unnest(f"kiln_has_{column}", Boolean()).label(f"has_{column}"))
    given = select(*columns).cte("kiln_moves")
    changes = _changes(to, shared)
    for column, partial in own:
        value = given.c[f"own_{column}"]
        if isinstance(table.c[column].type, JSON):
            value = cast(value, table.c[column].type)
        changes[column] = case((given.c[f"has_{column}"], value), else_=table.c[column]) if partial else value
    moved = (update(table)
             .where(table.c.id == given.c.id, table.c.attempts == given.c.token, table.c.state == current, *where)
             .values(changes)
             .returning(table.c.id, table.c.attempts, table.c.webhook, table.c.owner_id, given.c.ord,
                        given.c.message, given.c.data, given.c.also_kind, given.c.also_message, given.c.also_data)
             .cte("kiln_moved"))
    ctes = [_events_inserted(moved, current, to, event), *(follow(moved) if follow is not None else [])]
    return select(moved.c.id, moved.c.attempts, moved.c.webhook, moved.c.owner_id, moved.c.ord).add_cte(*ctes)


def _events_inserted(moved: CTE, current: str, to: str, event: str) -> CTE:
    """The events of :func:`_one_statement`'s moved rows, as a CTE: each job's state event, then
    its extra one (``also``) where it has one."""
    events = JobEvent.__table__
    at = bindparam("kiln_now", type_=events.c.at.type)
    attempt = func.nullif(moved.c.attempts, 0)
    state_events = select(moved.c.id.label("job_id"), at.label("at"), literal(event, Text()).label("kind"),
                          literal(current, Text()).label("from_state"), literal(to, Text()).label("to_state"),
                          attempt.label("attempt"), moved.c.message.label("message"),
                          cast(moved.c.data, events.c.data.type).label("data"), moved.c.ord.label("ord"),
                          literal(0, Integer()).label("n"))
    also_events = select(moved.c.id, at, moved.c.also_kind, cast(null(), Text()), cast(null(), Text()), attempt,
                         moved.c.also_message, cast(moved.c.also_data, events.c.data.type), moved.c.ord,
                         literal(1, Integer())).where(moved.c.also_kind.is_not(None))
    both = union_all(state_events, also_events).subquery("kiln_event_rows")
    # Ordered, so a job's extra event gets a higher id than its state event, as with the other databases.
    return insert(events).from_select(
        ["job_id", "at", "kind", "from_state", "to_state", "attempt", "message", "data"],
        select(both.c.job_id, both.c.at, both.c.kind, both.c.from_state, both.c.to_state, both.c.attempt,
               both.c.message, both.c.data).order_by(both.c.ord, both.c.n),
    ).cte("kiln_events")
