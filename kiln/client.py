"""``KilnClient``: the JSON API (``/api/v1``) from Python, with bounded idempotent retries and ETag polls.

Importing it loads neither torch nor Flask: it needs only ``httpx``.
"""

from __future__ import annotations

import email.utils
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from kiln.errors import (
    Conflict, Forbidden, InvalidSpec, KilnConnectionError, KilnError, NotFound, RateLimited, ServerError,
    Unauthorized, WaitTimeout, error_for,
)

TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})
API_PREFIX = "/api/v1"


def _retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class KilnClient:
    """A Kiln server at ``url`` used with the API token ``token``; every method answers plain dicts."""

    def __init__(self, url: str, token: str | None, *, timeout: float = 30.0, connect_retries: int = 3,
                 rate_limit_retries: int = 3, max_retry_after: float = 60.0, backoff: float = 0.5,
                 transport: httpx.BaseTransport | None = None):
        self.url = url.rstrip("/")
        self.connect_retries = connect_retries
        self.rate_limit_retries = rate_limit_retries
        self.max_retry_after = max_retry_after
        self.backoff = backoff
        headers = {"Accept": "application/json", "User-Agent": "kiln-client"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, transport=transport)
        # ETag -> body of the last answer per GET (path and query), so unchanged polls are 304s.
        self._etags: OrderedDict[str, tuple[str, Any]] = OrderedDict()
        self.stats = {"requests": 0, "not_modified": 0, "retries": 0}

    def __enter__(self) -> KilnClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    # -- transport -------------------------------------------------------------------------------

    def _request(self, method: str, path: str, *, params: dict[str, Any] | None = None, json: Any = None,
                 files: Any = None, data: Any = None, idempotency_key: str | None = None) -> Any:
        """Send one logical request: GETs (and keyed writes) retried on connection errors, any on 429."""
        url = API_PREFIX + path
        params = {k: v for k, v in (params or {}).items() if v is not None}
        headers: dict[str, str] = {}
        if idempotency_key:
            headers["Idempotency-Key"] = idempotency_key
        cache_key = None
        if method == "GET":
            cache_key = str(httpx.URL(url, params=params))
            if cache_key in self._etags:
                headers["If-None-Match"] = self._etags[cache_key][0]
        # A write without a key may have reached the server before the connection broke: never resend it.
        resendable = method == "GET" or idempotency_key is not None
        connect_failures = rate_limited = 0
        while True:
            self.stats["requests"] += 1
            try:
                response = self._http.request(method, url, params=params, json=json, files=files, data=data,
                                              headers=headers)
            except httpx.TransportError as exc:
                if resendable and connect_failures < self.connect_retries:
                    time.sleep(min(self.backoff * 2 ** connect_failures, 10.0))
                    connect_failures += 1
                    self.stats["retries"] += 1
                    continue
                raise KilnConnectionError(f"cannot reach {self.url}: {exc or type(exc).__name__}",
                                          title="Connection failed") from None
            if response.status_code == 429:
                wait = _retry_after(response.headers.get("Retry-After"))
                if rate_limited < self.rate_limit_retries and wait is not None and wait <= self.max_retry_after:
                    time.sleep(wait)
                    rate_limited += 1
                    self.stats["retries"] += 1
                    continue
                raise self._error(response, retry_after=wait)
            if response.status_code == 304 and cache_key in self._etags:
                self.stats["not_modified"] += 1
                self._etags.move_to_end(cache_key)
                return self._etags[cache_key][1]
            if response.status_code >= 400:
                raise self._error(response)
            body = response.json() if response.content else None
            if cache_key is not None and (etag := response.headers.get("ETag")):
                self._etags[cache_key] = (etag, body)
                self._etags.move_to_end(cache_key)
                while len(self._etags) > 64:
                    self._etags.popitem(last=False)
            return body

    @staticmethod
    def _error(response: httpx.Response, *, retry_after: float | None = None) -> KilnError:
        try:
            body = response.json()
        except ValueError:
            body = {"title": response.reason_phrase, "detail": response.text[:200].strip() or None}
        if not isinstance(body, dict):
            body = {"title": response.reason_phrase}
        return error_for(response.status_code, body, retry_after=retry_after)

    # -- jobs ------------------------------------------------------------------------------------

    def submit(self, spec: dict[str, Any], *, idempotency_key: str | None = None) -> dict[str, Any]:
        """Submit a job spec (train or predict); answers the recorded job. Raises InvalidSpec on a 422."""
        return self._request("POST", "/jobs", json=spec, idempotency_key=idempotency_key or str(uuid.uuid4()))

    def get_job(self, job_id: int) -> dict[str, Any]:
        """One job: state, progress, latest metrics, result, error (an unchanged poll is a 304)."""
        return self._request("GET", f"/jobs/{int(job_id)}")

    def list_jobs(self, *, state: str | None = None, kind: str | None = None, limit: int | None = None,
                  cursor: str | None = None) -> dict[str, Any]:
        """A page of jobs, newest first: ``{"items": [...], "next_cursor": ...}``."""
        return self._request("GET", "/jobs", params={"state": state, "kind": kind, "limit": limit, "cursor": cursor})

    def wait(self, job_id: int, *, timeout: float | None = None, interval: float = 0.5,
             max_interval: float = 5.0) -> dict[str, Any]:
        """Poll until the job succeeded, failed or was cancelled; the poll slows while nothing changes."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = interval
        while True:
            job = self.get_job(job_id)
            if job["state"] in TERMINAL_STATES:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout(f"job {job_id} is still {job['state']} after {timeout:g} s", title="Timed out")
            time.sleep(delay if deadline is None else max(0.0, min(delay, deadline - time.monotonic())))
            delay = min(delay * 1.5, max_interval)

    def watch(self, job_id: int, *, interval: float = 0.5, max_interval: float = 5.0) -> Iterable[dict[str, Any]]:
        """Yield the job each time it changes (ETag polls), ending after it reaches a final state."""
        last = None
        delay = interval
        while True:
            job = self.get_job(job_id)
            if job is not last:
                yield job
                last, delay = job, interval
            if job["state"] in TERMINAL_STATES:
                return
            time.sleep(delay)
            delay = min(delay * 1.5, max_interval)

    def metrics(self, job_id: int, *, scope: str | None = None, after: int | None = None, limit: int | None = None,
                latest: bool = False, points: int | None = None) -> dict[str, Any]:
        """The job's metrics reports (``items``, ``next_after``), or downsampled ``series`` with ``points``."""
        return self._request("GET", f"/jobs/{int(job_id)}/metrics", params={
            "scope": scope, "after": after, "limit": limit, "latest": "true" if latest else None, "points": points,
        })

    def events(self, job_id: int) -> list[dict[str, Any]]:
        """The job's events in order: state changes, resumes, failures."""
        return self._request("GET", f"/jobs/{int(job_id)}/events")["items"]

    def cancel(self, job_id: int) -> dict[str, Any]:
        """Request cancellation (Conflict if the job already finished)."""
        return self._request("POST", f"/jobs/{int(job_id)}/cancel")

    def retry(self, job_id: int) -> dict[str, Any]:
        """Queue a failed or cancelled job again (Conflict otherwise)."""
        return self._request("POST", f"/jobs/{int(job_id)}/retry")

    def pause(self, job_id: int) -> dict[str, Any]:
        """Pause a queued or running training job at its next checkpoint."""
        return self._request("POST", f"/jobs/{int(job_id)}/pause")

    def resume(self, job_id: int) -> dict[str, Any]:
        """Queue a paused job again; it continues from its checkpoint."""
        return self._request("POST", f"/jobs/{int(job_id)}/resume")

    def predict(self, model: str, inputs: list[Any], *, wait: bool = False, timeout: float | None = None,
                **spec: Any) -> dict[str, Any]:
        """Submit a prediction job for ``model`` (``name@latest``, ``name@3``, a job id); with ``wait``,
        answer the finished job (its ``result`` holds the predictions)."""
        job = self.submit({"kind": "predict", "model": model, "inputs": inputs, **spec})
        return self.wait(job["id"], timeout=timeout, interval=0.2) if wait else job

    # -- datasets, models, tokens ------------------------------------------------------------------

    def upload_dataset(self, path: str | Path, *, name: str | None = None, format: str | None = None) -> dict[str, Any]:
        """Upload a CSV, JSONL or Parquet file; answers the dataset with its inferred schema."""
        path = Path(path)
        content = path.read_bytes()
        form = {k: v for k, v in {"name": name, "format": format}.items() if v}
        return self._request("POST", "/datasets", files={"file": (path.name, content)}, data=form,
                             idempotency_key=str(uuid.uuid4()))

    def datasets(self) -> list[dict[str, Any]]:
        """Built-in datasets, then the caller's uploads."""
        return self._request("GET", "/datasets")["items"]

    def dataset(self, dataset_id: int | str) -> dict[str, Any]:
        """One uploaded dataset (``7`` or ``dataset:7``) with its schema."""
        return self._request("GET", f"/datasets/{int(str(dataset_id).removeprefix('dataset:'))}")

    def models(self, *, limit: int | None = None) -> list[dict[str, Any]]:
        """The caller's registered model versions, newest first."""
        return self._request("GET", "/models", params={"limit": limit})["items"]

    def model(self, name: str) -> dict[str, Any]:
        """One model name: its live versions (lineage, input schema) and its aliases (``GET /models/<name>``)."""
        return self._request("GET", f"/models/{quote(name, safe='')}")

    def set_alias(self, name: str, alias: str, version: int,
                  serving: dict[str, Any] | None = None) -> dict[str, Any]:
        """Point ``name@alias`` at ``version`` (``PUT /models/<name>/aliases/<alias>``); returns the model.

        ``serving`` (``max_batch_size``, ``max_delay_ms``, ``warm``) replaces the alias's serving
        settings; without it a moved alias keeps them.
        """
        body: dict[str, Any] = {"version": version}
        if serving is not None:
            body["serving"] = serving
        return self._request("PUT", f"/models/{quote(name, safe='')}/aliases/{quote(alias, safe='')}", json=body)

    def set_serving(self, name: str, version: int, *, max_batch_size: int | None = None,
                    max_delay_ms: int | None = None) -> dict[str, Any]:
        """Replace a version's micro-batch limits (None: the global setting); returns the version."""
        return self._request("PUT", f"/models/{quote(name, safe='')}/versions/{int(version)}/serving",
                             json={"max_batch_size": max_batch_size, "max_delay_ms": max_delay_ms})

    def remove_alias(self, name: str, alias: str) -> None:
        """Remove an alias (``DELETE /models/<name>/aliases/<alias>``)."""
        self._request("DELETE", f"/models/{quote(name, safe='')}/aliases/{quote(alias, safe='')}")

    def delete_version(self, name: str, version: int) -> None:
        """Delete ``name@version`` (409 while an alias or a queued or running job uses it)."""
        self._request("DELETE", f"/models/{quote(name, safe='')}/versions/{int(version)}")

    def tokens(self) -> list[dict[str, Any]]:
        """The caller's API tokens (``GET /tokens``; not every server has it yet)."""
        body = self._request("GET", "/tokens")
        return body["items"] if isinstance(body, dict) and "items" in body else body

    def create_token(self, name: str, *, expires_at: str | None = None) -> dict[str, Any]:
        """Create an API token named ``name`` (``expires_at``: an ISO date or time); the answer's
        ``token`` is the only time its secret is shown."""
        body = {"name": name} | ({"expires_at": expires_at} if expires_at else {})
        return self._request("POST", "/tokens", json=body, idempotency_key=str(uuid.uuid4()))

    def revoke_token(self, token_id: int | str) -> None:
        """Revoke one of the caller's tokens (``DELETE /tokens/<id>``)."""
        self._request("DELETE", f"/tokens/{token_id}")

    def check(self) -> None:
        """Raise (Unauthorized, KilnConnectionError...) unless the server accepts this token."""
        self._request("GET", "/jobs", params={"limit": 1})


__all__ = ["TERMINAL_STATES", "Conflict", "Forbidden", "InvalidSpec", "KilnClient", "KilnConnectionError", "KilnError",
           "NotFound", "RateLimited", "ServerError", "Unauthorized", "WaitTimeout"]
