"""The web baseline: a bare Flask endpoint doing one INSERT and one LPUSH, nothing else.

Served by gunicorn with the flags ``kiln web`` uses, on the same database (same engine settings,
``app.db.make_engine``) and the same Redis as the Kiln web it is compared with.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone

import redis
from flask import Flask, request
from sqlalchemy import Column, DateTime, Integer, MetaData, Table, Text

from app.db import make_engine

JOBS = Table(
    "bench_bare_jobs", MetaData(),
    Column("id", Integer, primary_key=True), Column("spec", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)
QUEUE_KEY = "bench:bare:jobs"


def create_app() -> Flask:
    """The bare app; reads ``KILN_DATABASE_URL`` and ``KILN_REDIS_URL`` like Kiln's web does."""
    app = Flask(__name__)
    engine = make_engine(os.environ["KILN_DATABASE_URL"])
    broker = redis.Redis.from_url(os.environ["KILN_REDIS_URL"])

    @app.post("/api/v1/jobs")
    def submit():
        spec = request.get_json(silent=True)
        if not isinstance(spec, dict):
            return {"error": "the body must be a JSON object"}, 400
        with engine.begin() as conn:
            result = conn.execute(JOBS.insert().values(spec=json.dumps(spec), created_at=datetime.now(timezone.utc)))
            job_id = result.inserted_primary_key[0]
        broker.lpush(QUEUE_KEY, json.dumps({"id": job_id}))
        return {"id": job_id, "state": "queued"}, 201

    return app
