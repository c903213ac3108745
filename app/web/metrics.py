"""Prometheus ``/metrics``: jobs by state, queue depth and wait, failures by class, worker heartbeats.

Values are read from the database (and Redis for queue depth) at scrape time, so every web
process answers the same numbers. Who may read them: see :func:`refusal`.
"""

from __future__ import annotations

import hmac

from flask import Blueprint, Response, abort, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import func, select

from app.db import session_scope
from app.models import Attempt, Job, JobCount, utcnow
from app.settings import PREDICT_QUEUE, TRAIN_QUEUE, Settings
from app.web.context import settings

metrics = Blueprint("metrics", __name__)


class KilnCollector:
    """Collects Kiln's gauges from the database and the broker."""

    def __init__(self, config: Settings):
        self.config = config

    def collect(self):
        """Yield one family per metric."""
        now = utcnow()
        jobs = GaugeMetricFamily("kiln_jobs", "Jobs by state and kind", labels=["state", "kind"])
        failures = GaugeMetricFamily("kiln_jobs_failed", "Failed jobs by failure class", labels=["class"])
        wait = GaugeMetricFamily("kiln_queue_oldest_wait_seconds", "Age of the oldest queued job", labels=["queue"])
        heartbeat = GaugeMetricFamily("kiln_worker_heartbeat_age_seconds",
                                      "Seconds since each worker running a job renewed its lease", labels=["worker"])
        duration = GaugeMetricFamily("kiln_job_duration_seconds_avg",
                                     "Mean run time of succeeded jobs (start to finish)", labels=["kind"])
        with session_scope(self.config.database_url) as s:
            # From the counts the database keeps (JobCount), not a count over every job.
            total = func.sum(JobCount.jobs)
            for state, kind, n in s.execute(select(JobCount.state, JobCount.kind, total)
                                            .group_by(JobCount.state, JobCount.kind).having(total > 0)):
                jobs.add_metric([state, kind], int(n))
            for cls, n in s.execute(select(Job.error_class, func.count()).where(Job.state == "failed")
                                    .group_by(Job.error_class)):
                failures.add_metric([cls or "unknown"], n)
            for queue, oldest in s.execute(select(Job.queue, func.min(Job.queued_at)).where(Job.state == "queued")
                                           .group_by(Job.queue)):
                wait.add_metric([queue], _age(now, oldest))
            for worker, last in s.execute(select(Attempt.worker, func.max(Attempt.heartbeat_at))
                                          .where(Attempt.ended_at.is_(None)).group_by(Attempt.worker)):
                heartbeat.add_metric([worker], _age(now, last))
            rows = s.execute(select(Job.kind, Job.started_at, Job.finished_at)
                             .where(Job.state == "succeeded").order_by(Job.id.desc()).limit(500)).all()
        by_kind: dict[str, list[float]] = {}
        for kind, started, finished in rows:
            if started and finished:
                by_kind.setdefault(kind, []).append((finished - started).total_seconds())
        for kind, values in by_kind.items():
            duration.add_metric([kind], sum(values) / len(values))
        yield from (jobs, failures, wait, heartbeat, duration)
        yield self._queue_depth()

    def _queue_depth(self) -> GaugeMetricFamily:
        depth = GaugeMetricFamily("kiln_queue_depth", "Messages waiting in the broker", labels=["queue"])
        try:
            import redis

            client = redis.Redis.from_url(self.config.redis_url, socket_connect_timeout=1, socket_timeout=1)
            for queue in (TRAIN_QUEUE, PREDICT_QUEUE):
                depth.add_metric([queue], client.llen(queue))
        except Exception:  # noqa: BLE001 - a down broker shows as a missing series, /readyz says why
            pass
        return depth


def _age(now, then) -> float:
    return max(0.0, (now - then).total_seconds()) if then else 0.0


def refusal(config: Settings, server_port: str, authorization: str) -> int | None:
    """The status that refuses this scrape (404 or 401), or ``None`` to serve it.

    With ``KILN_METRICS_PORT`` set, /metrics answers on that port only (the web port says 404, the
    metrics port serves nothing else). With ``KILN_METRICS_TOKEN`` set, it needs that bearer token.
    In production with neither, the web port does not serve it: metrics are never public by default.
    """
    if config.metrics_port is not None:
        if server_port != str(config.metrics_port):
            return 404
    elif not config.metrics_token and config.production:
        return 404
    if config.metrics_token:
        scheme, _, token = authorization.partition(" ")
        given, expected = token.strip().encode(), config.metrics_token.encode()
        if scheme.lower() != "bearer" or not hmac.compare_digest(given, expected):
            return 401
    return None


@metrics.before_app_request
def _metrics_port_serves_only_metrics():
    # The metrics port is for scrapers: the API and pages stay on the web port.
    port = settings().metrics_port
    if port is not None and request.environ.get("SERVER_PORT") == str(port) and request.path != "/metrics":
        abort(404)


@metrics.get("/metrics")
def prometheus():
    """Prometheus text exposition, if :func:`refusal` lets this request read it."""
    status = refusal(settings(), request.environ.get("SERVER_PORT", ""), request.headers.get("Authorization", ""))
    if status == 401:
        return Response("a bearer token is required\n", status=401, mimetype="text/plain",
                        headers={"WWW-Authenticate": 'Bearer realm="metrics"'})
    if status:
        abort(status)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(KilnCollector(settings()))
    return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST.split(";")[0],
                    headers={"Content-Type": CONTENT_TYPE_LATEST})
