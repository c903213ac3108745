"""The server-rendered pages: sign-in, the jobs list and a job's page (htmx polls their partials)."""

from __future__ import annotations

from flask import Blueprint, abort, flash, redirect, render_template, request, url_for
from flask_login import login_required, login_user, logout_user

from app import queue
from app.accounts import authenticate_password, can_write
from app.jobs import service
from app.jobs.errors import Conflict, NotFound
from app.jobs.states import STATES, TERMINAL, InvalidTransition
from app.models import MAX_ID
from app.web import serializers
from app.web.context import db, settings
from app.web.forms import ActionForm, LoginForm
from app.web.login import (
    WebUser, record_failed_sign_in, safe_next, sign_in_throttled, web_user, writer_required,
)

pages = Blueprint("pages", __name__, template_folder="templates")

PAGE_SIZE = 25
KINDS = ("train", "predict")
ACTIONS = ("cancel", "retry", "pause", "resume")


@pages.app_context_processor
def _globals():
    from flask_login import current_user

    user = current_user.user if current_user.is_authenticated else None
    return {"me": user, "may_write": user is not None and can_write(user), "TERMINAL": TERMINAL,
            "action_form": ActionForm()}


@pages.errorhandler(NotFound)
def _not_found(exc: NotFound):
    return render_template("error.html", status=404, message=str(exc)), 404


@pages.get("/")
def index():
    """Home is the jobs list."""
    return redirect(url_for("pages.jobs"))


@pages.route("/login", methods=["GET", "POST"])
def login():
    """Sign in with email and password; back to ``next`` (a local path) afterwards."""
    form = LoginForm()
    target = safe_next(request.args.get("next")) or url_for("pages.jobs")
    error = None
    status = 200
    if form.validate_on_submit():
        if sign_in_throttled(form.email.data):
            error, status = "Too many failed sign-ins. Wait a minute and try again.", 429
        else:
            user = authenticate_password(session=db(), email=form.email.data, password=form.password.data)
            if user is not None:
                login_user(WebUser(user))
                return redirect(target)
            record_failed_sign_in(form.email.data)
            error, status = "Wrong email or password, or the account is disabled.", 401
    elif request.method == "POST":
        status = 400
    return render_template("login.html", form=form, error=error, next=request.args.get("next")), status


@pages.post("/logout")
def logout():
    """Sign out (a POST with a CSRF token, so another site cannot sign you out)."""
    logout_user()
    flash("Signed out.")
    return redirect(url_for("pages.login"))


def _int_arg(name: str) -> int | None:
    raw = request.args.get(name) or ""
    if not raw:
        return None
    # ASCII digits within the id range: "²" passes isdigit() but fails int(), a huge one fails in the driver.
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= MAX_ID:
        abort(400, f"{name} must be a positive integer")
    return int(raw)


@pages.get("/jobs")
@login_required
def jobs():
    """The signed-in user's jobs, newest first, filtered by state and kind, paged by cursor."""
    state = request.args.get("state") or None
    kind = request.args.get("kind") or None
    if state is not None and state not in STATES:
        abort(400, f"state must be one of {', '.join(STATES)}")
    if kind is not None and kind not in KINDS:
        abort(400, f"kind must be one of {', '.join(KINDS)}")
    rows, next_cursor = service.list_jobs(
        session=db(), user=web_user(), limit=PAGE_SIZE, before_id=_int_arg("cursor"), state=state, kind=kind,
    )
    return render_template("jobs/list.html", jobs=rows, next_cursor=next_cursor, state=state, kind=kind,
                           states=STATES, kinds=KINDS)


@pages.get("/jobs/<int:job_id>/row")
@login_required
def job_row(job_id: int):
    """One row of the jobs list (htmx polls it while the job runs)."""
    job = service.get_job(session=db(), user=web_user(), job_id=job_id)
    return render_template("jobs/_row.html", job=job)


@pages.get("/jobs/<int:job_id>")
@login_required
def job(job_id: int):
    """Everything about one job: spec, state, progress, events, attempts, checkpoints, result, loss curve."""
    found = service.get_job(session=db(), user=web_user(), job_id=job_id)
    return render_template(
        "jobs/detail.html", job=found, detail=serializers.job_detail(db(), found),
        events=service.list_events(session=db(), user=web_user(), job_id=job_id),
    )


@pages.get("/jobs/<int:job_id>/status")
@login_required
def job_status(job_id: int):
    """The state/progress panel of a job's page (htmx polls it while the job runs)."""
    found = service.get_job(session=db(), user=web_user(), job_id=job_id)
    return render_template("jobs/_status.html", job=found, detail=serializers.job_detail(db(), found))


@pages.post("/jobs/<int:job_id>/<action>")
@writer_required
def job_action(job_id: int, action: str):
    """Cancel, retry, pause or resume through the same services as the API; back to the job's page."""
    if action not in ACTIONS:
        abort(404)
    session = db()
    try:
        if action == "retry":
            found = service.retry(session=session, user=web_user(), job_id=job_id, settings=settings())
        else:
            found = getattr(service, action)(session=session, user=web_user(), job_id=job_id)
        session.commit()
    except (Conflict, InvalidTransition) as exc:
        session.rollback()
        flash(str(exc), "error")
        return redirect(url_for("pages.job", job_id=job_id))
    if action in ("retry", "resume") and queue.publish(
        settings(), job_id=found.id, kind=found.kind, token=found.attempts, priority=found.priority,
    ):
        service.mark_published(session=session, job_id=found.id)
        session.commit()
    flash(f"Job {job_id}: {action} requested.")
    return redirect(url_for("pages.job", job_id=job_id))
