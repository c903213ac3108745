"""Engine, session factory and ``session_scope()``; shared by the web and the worker, no Flask here."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import orjson
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.orm import Session, sessionmaker

_lock = threading.Lock()
_engines: dict[str, Engine] = {}
_factories: dict[tuple[str, str], sessionmaker[Session]] = {}


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    # WAL lets the web read while a worker writes; busy_timeout waits out short write locks
    # instead of failing with "database is locked".
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


# An execution option a write session carries: on SQLite its transaction starts with BEGIN IMMEDIATE.
WRITE_OPTION = "kiln_write"
# A pooled PostgreSQL connection idle for longer than this is pinged before use; a busy pool
# (every connection checked in moments ago) pays nothing.
PING_AFTER_IDLE_SECONDS = 10.0
# Connections older than this are replaced, well before server or proxy idle cut-offs.
POOL_RECYCLE_SECONDS = 1800


def _sqlite_begin(conn: Connection) -> None:
    # pysqlite opens a deferred transaction just before the first INSERT/UPDATE, whose lock then
    # waits in SQLite's sleeping busy handler. A write session takes the write lock up front
    # instead, so its whole transaction (reads included) runs on one consistent snapshot and never
    # fails to upgrade; read sessions keep pysqlite's lock-free autocommit reads.
    # On the driver connection: SQLAlchemy's statement path would cost a submit a tenth of its SQL's CPU.
    if conn.get_execution_options().get(WRITE_OPTION):
        conn.connection.driver_connection.execute("BEGIN IMMEDIATE")


def _stamp_checkin(_dbapi_connection, record) -> None:
    record.info["checked_in_at"] = time.monotonic()


def _ping_if_idle(dbapi_connection, record, _proxy) -> None:
    # The checkout-time version of pool_pre_ping, paid only by a connection that sat idle (where a
    # server restart or a proxy cut-off may have killed it). Raising DisconnectionError makes the
    # pool discard it and hand out a fresh one. A connection that dies while busy fails its request
    # once; SQLAlchemy then invalidates the pool, so the next request reconnects.
    idle_since = record.info.get("checked_in_at")
    if idle_since is None or time.monotonic() - idle_since < PING_AFTER_IDLE_SECONDS:
        return
    try:
        cursor = dbapi_connection.cursor()
        cursor.execute("SELECT 1")
        cursor.close()
        dbapi_connection.rollback()
    except Exception as exc:  # noqa: BLE001 - any failure means: not usable, reconnect
        raise DisconnectionError(f"pooled connection failed its idle ping: {exc!r}") from exc


def json_loads(text: str):
    # JSON columns are read on every poll (metric values, specs): orjson parses them several times
    # faster. Rows written before non-finite numbers were stored as null may hold NaN literals,
    # which only the standard library reads.
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


def make_engine(url: str) -> Engine:
    """Create an engine with the per-backend settings Kiln relies on."""
    if url.startswith("sqlite"):
        from pathlib import Path

        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30}, json_deserializer=json_loads)
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    # Every Kiln transaction is short. A process frozen inside one (SIGSTOP, a partition) would
    # hold its row locks and stall the reaper, so the server ends such a session after 15 s.
    connect_args = {"options": "-c idle_in_transaction_session_timeout=15000"} if url.startswith("postgresql") else {}
    engine = create_engine(url, json_deserializer=json_loads, pool_pre_ping=False, pool_recycle=POOL_RECYCLE_SECONDS, pool_size=5,
                           max_overflow=10, connect_args=connect_args)
    event.listen(engine, "checkin", _stamp_checkin)
    event.listen(engine, "checkout", _ping_if_idle)
    return engine


def _resolve(url: str | None) -> str:
    if url is None:
        from app.settings import SETTINGS

        return SETTINGS.database_url
    return url


def get_engine(url: str | None = None) -> Engine:
    """Return the process's engine for ``url`` (default: the configured database)."""
    url = _resolve(url)
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            engine = _engines[url] = make_engine(url)
            _factories[url, "read"] = sessionmaker(bind=engine, expire_on_commit=False)
            writer = engine.execution_options(**{WRITE_OPTION: True})
            _factories[url, "write"] = sessionmaker(bind=writer, expire_on_commit=False)
            # PostgreSQL: no BEGIN and ROLLBACK round trips around a request that only reads; at READ
            # COMMITTED each statement sees its own snapshot either way. pysqlite already reads so.
            poll = engine.execution_options(isolation_level="AUTOCOMMIT") if engine.dialect.name == "postgresql" else engine
            _factories[url, "poll"] = sessionmaker(bind=poll, expire_on_commit=False)
        return engine


def session_factory(url: str | None = None, *, write: bool = False, poll: bool = False) -> sessionmaker[Session]:
    """Return the session factory for ``url``; ``write=True`` for a session that will write
    (on SQLite it takes the write lock when its transaction starts); ``poll=True`` for a web
    request that only reads (each statement commits at once: use it for nothing that must be atomic)."""
    url = _resolve(url)
    get_engine(url)
    return _factories[url, "write" if write else "poll" if poll else "read"]


@contextmanager
def session_scope(url: str | None = None, *, write: bool = False) -> Iterator[Session]:
    """A short transaction: commit on success, roll back on error, always close."""
    session = session_factory(url, write=write)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def dispose_all() -> None:
    """Drop pooled connections; called in a child process after fork."""
    with _lock:
        for engine in _engines.values():
            engine.dispose(close=False)
