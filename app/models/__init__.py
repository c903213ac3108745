"""SQLAlchemy 2.0 models, one module per concept; importing this package registers them all."""

from app.models.base import MAX_ID, Base, utcnow
from app.models.checkpoints import Checkpoint
from app.models.datasets import Dataset
from app.models.events import JobEvent
from app.models.idempotency import IdempotencyKey
from app.models.jobs import JOB_COUNT_SHARDS, JOB_LIST_SHARDS, Attempt, Job, JobCount, JobListVersion
from app.models.leases import ServiceLease
from app.models.metrics import Metric, MetricCurveChunk
from app.models.model_versions import ModelAlias, ModelVersion
from app.models.usage import UsageTotal
from app.models.users import ApiToken, User
from app.models.webhooks import WebhookAttempt, WebhookDelivery

__all__ = [
    "IdempotencyKey",
    "MAX_ID",
    "ApiToken",
    "Attempt",
    "Base",
    "Checkpoint",
    "Dataset",
    "JOB_COUNT_SHARDS",
    "JOB_LIST_SHARDS",
    "Job",
    "JobEvent",
    "JobCount",
    "JobListVersion",
    "Metric",
    "MetricCurveChunk",
    "ModelAlias",
    "ModelVersion",
    "ServiceLease",
    "UsageTotal",
    "User",
    "WebhookAttempt",
    "WebhookDelivery",
    "utcnow",
]
