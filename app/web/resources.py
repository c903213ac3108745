"""Pydantic models of the API's answers: exactly what app/web/serializers.py (and the other views) send.

They exist for the OpenAPI document (app/web/openapi.py) and for the tests that validate every
serializer's output against them (tests/web/test_openapi.py), so the document cannot drift from
the JSON. Unknown keys are refused: a new field must be added here, where the document shows it.
Free-form parts (a spec, a result, a schema, metric values) are plain objects.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Time = str  # ISO 8601, UTC
Object = dict[str, Any]


class Resource(BaseModel):
    """Base of every answer model: unknown keys are a drift between the code and the document."""

    model_config = ConfigDict(extra="forbid")


class JobError(Resource):
    """Why a job failed: its failure class and a message a person can act on."""

    class_: str = Field(alias="class", description="user_error, oom, timeout, worker_lost or internal")
    message: str | None


class JobSummary(Resource):
    """A job as lists show it."""

    id: int
    kind: Literal["train", "predict"]
    name: str | None
    state: str
    progress: float
    epoch: int | None
    attempts: int
    created_at: Time | None
    started_at: Time | None
    finished_at: Time | None
    error: JobError | None


class Checkpoint(Resource):
    """A checkpoint row."""

    id: int
    epoch: int | None
    step: int | None
    attempt: int | None
    path: str
    size_bytes: int | None
    sha256: str | None
    is_best: bool
    reason: str | None
    metric: dict[str, float | None] | None
    created_at: Time | None


class ListedCheckpoint(Checkpoint):
    """A checkpoint in a job's checkpoint list, with the URL of its file."""

    download: str


class Attempt(Resource):
    """One run of a job by one worker process."""

    number: int
    worker: str | None
    host: str | None
    pid: int | None
    started_at: Time | None
    ended_at: Time | None
    start_epoch: int | None
    start_step: int | None
    outcome: str | None


class VersionServing(Resource):
    """A version's micro-batch limits; null: the global KILN_PREDICT_MAX_BATCH_SIZE / _MAX_DELAY_MS."""

    max_batch_size: int | None = Field(description="predictions run in one forward pass at most (1: no batching)")
    max_delay_ms: int | None = Field(description="how long a batch that found company waits for more")


class AliasServing(VersionServing):
    """An alias's serving settings; null limits: its version's, then the global ones."""

    warm: bool = Field(description="prediction workers load this alias's version when they start")


class ModelVersion(Resource):
    """A registered model version."""

    id: int
    name: str
    version: int
    ref: str = Field(description="name@version, what a prediction spec's model names")
    job_id: int | None
    arch: str
    task: str
    signature: Object | None
    metrics: Object | None
    created_at: Time | None
    input_schema: Object | None = Field(description="what a prediction must send (kind numbers, text, image...)")
    lineage: Object | None = Field(description="base version, dataset and its sha256, spec of the training job")
    deleted_at: Time | None
    serving: VersionServing


class RegistryVersion(ModelVersion):
    """A live version as its model lists it, with the aliases that point at it."""

    aliases: list[str]


class Model(Resource):
    """A model name: its live versions (newest first) and its aliases."""

    name: str
    aliases: dict[str, int] = Field(description="alias -> version number (latest is implicit)")
    alias_serving: dict[str, AliasServing] = Field(description="alias -> its serving settings (stored aliases)")
    versions: list[RegistryVersion]


class Job(JobSummary):
    """Everything about one job."""

    queue: str
    priority: str
    max_attempts: int
    step: int | None
    queued_at: Time | None
    updated_at: Time | None
    cancel_requested_at: Time | None
    pause_requested_at: Time | None
    resumed_from_epoch: int | None
    latest_metrics: Object | None
    checkpoints: list[Checkpoint]
    attempt_history: list[Attempt]
    model: ModelVersion | None
    init_from: str | None = Field(description="the name@N a fine-tuning job was pinned to at submit")
    result: Object | None
    spec: Object


class JobList(Resource):
    """A page of jobs, newest first."""

    items: list[JobSummary]
    next_cursor: str | None = Field(description="pass back as cursor (with the same filters) for the next page")


class Metric(Resource):
    """One metrics report."""

    id: int
    attempt: int | None
    scope: Literal["epoch", "step", "test"]
    epoch: int | None
    step: int | None
    values: dict[str, Any]
    at: Time | None


class MetricPage(Resource):
    """Metrics reports in order."""

    items: list[Metric]
    next_after: int | None


class MetricSeries(Resource):
    """One downsampled curve: points are [id, epoch, step, value]."""

    scope: str
    name: str
    count: int
    points: list[list[float | int | None]]


class MetricCurves(Resource):
    """Downsampled curves (``points=N``)."""

    points: int
    series: list[MetricSeries]
    next_after: int | None


class Event(Resource):
    """One job event."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    id: int
    at: Time | None
    kind: str
    from_: str | None = Field(alias="from")
    to: str | None
    attempt: int | None
    message: str | None


class EventList(Resource):
    """A job's events in order."""

    items: list[Event]


class CheckpointList(Resource):
    """A job's checkpoints, oldest first."""

    items: list[ListedCheckpoint]


class LogLine(Resource):
    """One line of a job's log."""

    id: int
    at: Time | None
    level: str
    attempt: int | None
    kind: str
    message: str | None
    text: str


class LogLines(Resource):
    """A job's log lines, oldest first."""

    items: list[LogLine]


class ModelList(Resource):
    """Model versions, newest first."""

    items: list[ModelVersion]


class Dataset(Resource):
    """An uploaded dataset with its inferred schema."""

    id: str = Field(description="dataset:<n>, what a spec's dataset.id names")
    builtin: Literal[False]
    name: str
    format: str
    rows: int | None
    size_bytes: int | None
    sha256: str | None
    schema_: Object | None = Field(alias="schema")
    created_at: Time | None


class BuiltinDataset(Resource):
    """A built-in dataset a spec may name."""

    id: str = Field(description="builtin:<name>")
    builtin: Literal[True]
    task: str
    source: str
    description: str
    rows: int | None
    features: int | None
    classes: int | None
    target: str | None


class DatasetList(Resource):
    """Built-in datasets, then the caller's uploads."""

    items: list[BuiltinDataset | Dataset]


class DatasetRows(Resource):
    """The first rows of an uploaded dataset."""

    columns: list[str]
    rows: list[list[Any]]


class Token(Resource):
    """An API token as the API shows it (never its secret)."""

    id: int
    name: str
    prefix: str
    status: Literal["active", "revoked", "expired"]
    created_at: Time
    last_used_at: Time | None
    expires_at: Time | None
    revoked_at: Time | None


class CreatedToken(Token):
    """A new token: ``token`` is the secret, shown this once."""

    token: str


class TokenList(Resource):
    """The caller's tokens."""

    items: list[Token]


class User(Resource):
    """A user (never the password hash)."""

    id: int
    email: str
    role: Literal["admin", "user", "viewer"]
    active: bool
    has_password: bool
    created_at: Time


class CreatedUser(User):
    """A new user with a first API token, shown this once."""

    token: str


class UserList(Resource):
    """Every user."""

    items: list[User]


class WebhookSecret(Resource):
    """The caller's webhook signing secret as shown again: its prefix (nulls when none exists)."""

    prefix: str | None
    created_at: Time | None


class CreatedWebhookSecret(WebhookSecret):
    """A new signing secret, shown this once."""

    secret: str


class WebhookAttempt(Resource):
    """One try at delivering a webhook."""

    attempt: int
    at: Time | None
    status_code: int | None
    error: str | None
    duration_ms: int | None
    response_prefix: str | None
    next_retry_at: Time | None


class WebhookDelivery(Resource):
    """One webhook delivery with its attempts, oldest first."""

    id: int
    webhook_id: str
    event: str
    status: str
    attempts: int
    created_at: Time | None
    next_retry_at: Time | None
    finished_at: Time | None
    payload: Object
    log: list[WebhookAttempt]


class WebhookDeliveryList(Resource):
    """A job's webhook deliveries."""

    items: list[WebhookDelivery]


class Pretrained(Resource):
    """A pretrained-catalog entry."""

    name: str
    hf_name: str
    package: str
    weights: str
    sha256: str
    size_bytes: int
    licence: str
    parameters: int
    hidden_size: int
    num_layers: int
    max_length: int
    pooling: str
    tasks: list[str]
    description: str
    installed: bool


class PretrainedList(Resource):
    """The pretrained catalog."""

    items: list[Pretrained]


class QueueLoad(Resource):
    """One queue on the admin overview."""

    name: str
    depth: int | None = Field(description="the broker's LLEN; null when Redis does not answer")
    queued_jobs: int
    oldest_wait_seconds: float | None


class BusyWorker(Resource):
    """An attempt that has not ended (the overview's workers)."""

    worker: str | None
    host: str | None
    pid: int | None
    job_id: int
    job_name: str | None
    attempt: int
    started_at: Time | None
    last_heartbeat_at: Time | None
    heartbeat_age_seconds: float | None


class RunningJob(Resource):
    """A running job on the overview."""

    id: int
    name: str | None
    kind: str
    owner: str
    progress: float
    epoch: int | None
    step: int | None
    attempt: int
    lease_owner: str | None
    started_at: Time | None


class RecentFailure(Resource):
    """A failed job on the overview."""

    id: int
    name: str | None
    owner: str
    error_class: str | None
    error_message: str | None
    finished_at: Time | None


class UserCompute(Resource):
    """One user's jobs and compute on the overview."""

    user_id: int
    email: str
    role: str
    jobs: int
    attempts: int
    compute_seconds: float = Field(description="run time of all their attempts (a running one up to now)")
    cpu_seconds: float = Field(description="the part on CPU (attempts whose device was not recorded included)")
    gpu_seconds: float = Field(description="the part on a CUDA device")


class Overview(Resource):
    """The admin dashboard's data."""

    generated_at: Time
    jobs_by_state: dict[str, int]
    queues: list[QueueLoad]
    workers: list[BusyWorker]
    running: list[RunningJob]
    recent_failures: list[RecentFailure]
    usage: list[UserCompute]


class StorageBytes(Resource):
    """Stored bytes by kind."""

    checkpoints: int
    datasets: int
    total: int


class JobUsage(Resource):
    """One job's usage."""

    job_id: int
    name: str | None
    cpu_seconds: float
    gpu_seconds: float
    checkpoint_bytes: int


class UserUsage(Resource):
    """One user's usage."""

    user_id: int
    email: str
    cpu_seconds: float
    gpu_seconds: float
    jobs: int
    storage_bytes: StorageBytes
    per_job: list[JobUsage]


class Usage(Resource):
    """Compute seconds, jobs and storage bytes per user and per job over a range."""

    from_: Time | None = Field(alias="from")
    to: Time
    note: str
    users: list[UserUsage]


class FieldError(Resource):
    """One field at fault."""

    field: str
    message: str


class Problem(BaseModel):
    """RFC 9457 problem details; some kinds add members (quota, limit, used...)."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(description="/problems/<kind>: stable per kind of error (docs/api.md, Errors)",
                      json_schema_extra={"format": "uri-reference"})
    title: str
    status: int
    detail: str | None = None
    error_id: str | None = Field(default=None, description="500 only: the id the server logged the error under")
    errors: list[FieldError] | None = Field(default=None, description="validation errors: each field at fault")
    quota: str | None = None
    limit: float | None = None
    used: float | None = None


# --- request bodies that are not job specs ---------------------------------------------------


class TokenRequest(BaseModel):
    """A new token's name and optional expiry."""

    name: str = Field(min_length=1, max_length=100)
    expires_at: str | None = Field(default=None, description="YYYY-MM-DD (through that day, UTC) or an ISO datetime")


class ServingRequest(BaseModel):
    """A version's micro-batch limits (null or left out: the global setting)."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int | None = Field(default=None, ge=1, le=1024)
    max_delay_ms: int | None = Field(default=None, ge=0, le=1000)


class AliasServingRequest(ServingRequest):
    """An alias's serving settings (null limits: its version's, then the global ones)."""

    warm: bool = False


class AliasRequest(BaseModel):
    """Which version an alias points at, and optionally its serving settings (left out: kept as they are)."""

    model_config = ConfigDict(extra="forbid")

    version: int = Field(ge=1, le=2**31 - 1)
    serving: AliasServingRequest | None = None


class UserRequest(BaseModel):
    """A new user."""

    email: str = Field(min_length=3, max_length=320)
    role: Literal["admin", "user", "viewer"] = "user"
    password: str | None = None


class UserUpdate(BaseModel):
    """Changes to a user; absent fields stay as they are."""

    role: Literal["admin", "user", "viewer"] | None = None
    active: bool | None = None
    password: str | None = None


class DatasetUpload(BaseModel):
    """A multipart dataset upload."""

    file: bytes = Field(description="the file (CSV, JSONL, Parquet or a zip of class folders)",
                        json_schema_extra={"format": "binary", "contentMediaType": "application/octet-stream"})
    name: str | None = Field(default=None, max_length=200)
    format: Literal["csv", "jsonl", "ndjson", "parquet", "zip"] | None = None
