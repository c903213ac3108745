"""Models as services on the ``api`` blueprint: inline predictions and batch-file prediction output."""

from __future__ import annotations

from flask import request, send_file

from app import storage
from app.jobs import service
from app.jobs.errors import Conflict, NotFound, SpecError
from app.jobs.schemas import parse_spec
from app.jobs.states import SUCCEEDED
from app.models import utcnow
from app.web import inline
from app.web.api import api
from app.web.auth import current_user
from app.web.context import db, reader, release_reader, settings
from app.web.publishing import publish

OUTPUT_NAME = "jobs/{job_id}/predictions.jsonl"  # worker.batch_files.output_path; the web never imports worker


@api.post("/models/<path:ref>/predict")
def predict_with_model(ref: str):
    """Predict with a model: 200 with the finished job when it ends within ``wait`` seconds, else 202 to poll."""
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise SpecError.at("(body)", "the request body must be a JSON object such as {\"inputs\": [[...]]}")
    for key in ("kind", "model"):
        if key in body:
            raise SpecError.at(key, "leave it out: the model is named in the URL and the kind is predict")
    spec = parse_spec({**body, "kind": "predict", "model": ref})
    wait = inline.wait_arg(default=settings().inline_wait_seconds)
    user = current_user()
    # As POST /jobs does: the validation's reads take no write lock (on SQLite, a read session of
    # their own), whose connection goes back to the pool before the write takes one.
    plan = service.check_submit(session=reader(), owner=user, spec=spec, settings=settings())
    release_reader()
    session = db()
    job = service.record_submit(session=session, owner=user, plan=plan, settings=settings(), published_at=utcnow())
    session.commit()
    publish(job, recorded=True)
    return inline.answer(job.id, wait, known=(plan.model, plan.base))


def output_file(job_id: int):
    """The finished output file of a batch-file prediction the current user may see (NotFound, Conflict)."""
    job = service.read_job(session=db(), user=current_user(), job_id=job_id)
    if job.kind != "predict" or not (job.spec or {}).get("dataset"):
        raise NotFound(f"job {job_id} has no output file (only predictions over a dataset write one)")
    if job.state != SUCCEEDED:
        raise Conflict(f"job {job_id} is {job.state}; its output file is complete once it succeeds")
    path = storage.resolve(settings().storage_root, OUTPUT_NAME.format(job_id=job_id))
    if not path.is_file():
        raise NotFound(f"the output file of job {job_id} is gone")
    return send_file(path, mimetype="application/x-ndjson", as_attachment=True,
                     download_name=f"job-{job_id}-predictions.jsonl", conditional=True)


@api.get("/jobs/<int:job_id>/output")
def job_output(job_id: int):
    """Download a batch-file prediction's JSONL output (streamed; one line per input row)."""
    return output_file(job_id)
