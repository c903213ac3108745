"""The server-rendered pages: sign-in, the jobs list, a job's page (htmx polls their partials), the submission forms."""

from __future__ import annotations

from flask import Blueprint, abort, flash, redirect, render_template, request, url_for
from flask_login import login_required, login_user, logout_user

from app import catalog, datasets
from app.accounts import authenticate_password, can_write
from app.jobs import job_log, service
from app.jobs.errors import Conflict, NotFound, SpecError
from app.jobs.schemas import parse_spec
from app.jobs.states import STATES, TERMINAL, InvalidTransition
from app.models import MAX_ID, utcnow
from app.web import conditional, serializers, spec_forms
from app.web.job_timing import timing_text
from app.web.context import db, settings
from app.web.publishing import publish
from app.web.forms import ActionForm, LoginForm
from app.web.login import (
    WebUser, record_failed_sign_in, safe_next, sign_in_throttled, web_user, writer_required,
)

pages = Blueprint("pages", __name__, template_folder="templates")

PAGE_SIZE = 25
LOG_LINES = 50  # the job's page shows this many of the newest log lines; the API has them all
KINDS = ("train", "predict")
ACTIONS = ("cancel", "retry", "pause", "resume")


@pages.app_context_processor
def _globals():
    from flask_login import current_user

    user = current_user.user if current_user.is_authenticated else None
    return {"me": user, "may_write": user is not None and can_write(user), "TERMINAL": TERMINAL,
            "action_form": ActionForm(), "heatmap": heatmap, "job_timing": lambda job: timing_text(job, utcnow())}


def _flat(values) -> list[float]:
    return [x for v in values for x in _flat(v)] if isinstance(values, list) else [float(values or 0.0)]


def heatmap(explanation: dict) -> dict:
    """An explanation as table cells with background colours scaled to the attribution (red +, blue -).

    Returns ``{"columns": [...], "rows": [(label, [(value, css colour), ...]), ...]}``: one row of
    tokens for text, steps x features for sequences, one row of features otherwise; an attention
    map is averaged over layers and heads (positions x positions, each row a distribution).
    """
    if explanation.get("method") == "attention":
        maps, positions = explanation.get("attention") or [], explanation.get("positions") or []
        n = len(positions)
        count = sum(len(layer) for layer in maps) or 1
        grid = [[sum(head[i][j] for layer in maps for head in layer) / count for j in range(n)] for i in range(n)]
        labels, columns = positions, positions
    else:
        values = explanation.get("attributions") or []
        if explanation.get("tokens") is not None:
            labels, columns, grid = [""], explanation["tokens"], [values]
        elif values and isinstance(values[0], list):
            labels, columns, grid = [f"step {i}" for i in range(len(values))], [f"f{j}" for j in range(len(values[0]))], values
        else:
            labels, columns, grid = [""], [f"f{j}" for j in range(len(values))], [values]
    scale = max((abs(x) for x in _flat(grid)), default=0.0) or 1.0

    def cell(x: float) -> tuple[float, str]:
        alpha = min(abs(x) / scale, 1.0) * 0.85
        return x, f"rgba(200,30,30,{alpha:.2f})" if x >= 0 else f"rgba(30,60,200,{alpha:.2f})"

    return {"columns": columns, "rows": [(label, [cell(float(x)) for x in row]) for label, row in zip(labels, grid)]}


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
    """One row of the jobs list (htmx polls it while the job runs; 304 while the job is unchanged)."""
    tag = conditional.job_tag("row", job_id)
    return conditional.answer(tag, lambda: render_template(
        "jobs/_row.html", job=service.get_job(session=db(), user=web_user(), job_id=job_id), version=tag))


@pages.get("/jobs/<int:job_id>")
@login_required
def job(job_id: int):
    """Everything about one job: spec, state, progress, events, attempts, checkpoints, result, loss curves, log."""
    # The status panel's ETag, read before the job: a poll that finds it unchanged keeps the panel as is.
    version = conditional.job_tag("status", job_id)
    found = service.get_job(session=db(), user=web_user(), job_id=job_id)
    return render_template(
        "jobs/detail.html", job=found, detail=serializers.job_detail(db(), found), version=version,
        events=service.list_events(session=db(), user=web_user(), job_id=job_id),
        log=job_log.tail(session=db(), user=web_user(), job_id=job_id, lines=LOG_LINES), log_lines=LOG_LINES,
    )


@pages.get("/jobs/<int:job_id>/status")
@login_required
def job_status(job_id: int):
    """The state/progress panel of a job's page (htmx polls it while the job runs; 304 while the job is
    unchanged). The panel carries its ETag as ``data-version``: the charts refetch when it changes."""
    tag = conditional.job_tag("status", job_id)

    def body() -> str:
        found = service.get_job(session=db(), user=web_user(), job_id=job_id)
        return render_template("jobs/_status.html", job=found, detail=serializers.job_detail(db(), found), version=tag)

    return conditional.answer(tag, body)


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
    if action in ("retry", "resume"):
        publish(found, recorded=False)
    flash(f"Job {job_id}: {action} requested.")
    return redirect(url_for("pages.job", job_id=job_id))


# --- submission forms ------------------------------------------------------------------------


def _choices() -> dict:
    """What the forms offer from the user's data: built-in datasets, uploads, registered model versions."""
    session, user = db(), web_user()
    return {"builtins": list(catalog.BUILTIN_DATASETS.values()),
            "uploads": datasets.list_owned(session=session, user=user),
            "versions": service.list_model_versions(session=session, user=user)}


def _columns(dataset_id: str, uploads: list) -> tuple[list[str], list[str] | None]:
    """The chosen dataset's columns, and its numeric ones to pick features from (None: typed by name)."""
    meta = catalog.builtin(dataset_id)
    if meta is not None:
        return list(dict.fromkeys([*meta.columns, *([meta.target] if meta.target else [])])), None
    for upload in uploads:
        if f"{catalog.UPLOAD_PREFIX}{upload.id}" == dataset_id:
            columns = upload.schema.get("columns", [])
            return [c["name"] for c in columns], [c["name"] for c in columns if c.get("numeric")]
    return [], None


def _render_train(form: spec_forms.FormView, status: int = 200, template: str = "jobs/new.html"):
    choices = _choices()
    columns, numeric = _columns(form.values.get("dataset.id") or "", choices["uploads"])
    return render_template(template, form=form, columns=columns, numeric=numeric, **choices), status


def _clone_spec(kind: str) -> dict | None:
    """The spec of the job named by ``?clone=`` (a job of ``kind`` the user may see), or None."""
    job_id = _int_arg("clone")
    if job_id is None:
        return None
    found = service.get_job(session=db(), user=web_user(), job_id=job_id)
    if found.kind != kind:
        abort(400, f"job {job_id} is a {found.kind} job; clone it from its own form")
    return found.spec


def _submit(form: spec_forms.FormView, payload: dict, local_errors: dict[str, list[str]]):
    """Validate and submit ``payload`` exactly as the API does; returns the job, or None with ``form``'s errors set."""
    try:
        spec = parse_spec(payload)
    except SpecError as exc:
        form.errors, form.general = spec_forms.field_errors(form.fields, exc)
        form.errors.update(local_errors)  # a field the form could not read has only its own error
        return None
    if local_errors:
        form.errors = local_errors
        return None
    session = db()
    try:
        job = service.submit(session=session, owner=web_user(), spec=spec, settings=settings(), published_at=utcnow())
        session.commit()
    except SpecError as exc:
        session.rollback()
        form.errors, form.general = spec_forms.field_errors(form.fields, exc)
        return None
    publish(job, recorded=True)
    flash(f"Job #{job.id} submitted.")
    return job


@pages.route("/jobs/new", methods=["GET", "POST"])
@writer_required
def new_job():
    """The training form: fresh, cloned from a job (``?clone=<id>``), or posted back with its errors."""
    if request.method == "GET":
        spec = _clone_spec("train")
        if spec is not None:
            fields = spec_forms.train_fields((spec.get("model") or {}).get("arch", "mlp"))
            return _render_train(spec_forms.FormView(fields, spec_forms.from_spec(fields, spec)))
        fields = spec_forms.train_fields(request.args.get("model.arch", "mlp"))
        return _render_train(spec_forms.FormView(fields, spec_forms.defaults(fields)))
    fields = spec_forms.train_fields(request.form.get("model.arch", ""))
    form = spec_forms.FormView(fields, spec_forms.from_form(fields, request.form))
    if request.form.get("refresh"):  # "Show fields" without JavaScript: the same form for the new choice
        return _render_train(form)
    payload, local_errors = spec_forms.to_payload(fields, form.values, "train")
    job = _submit(form, payload, local_errors)
    if job is None:
        return _render_train(form, 422)
    return redirect(url_for("pages.job", job_id=job.id))


@pages.get("/jobs/new/model-fields")
@writer_required
def new_job_model_fields():
    """The chosen architecture's fieldset (htmx swaps it in when the architecture changes)."""
    fields = spec_forms.train_fields(request.args.get("model.arch", "mlp"))
    form = spec_forms.FormView(fields, spec_forms.from_form(fields, request.args, partial=True))
    return _render_train(form, template="jobs/_model_fields.html")


@pages.get("/jobs/new/dataset-fields")
@writer_required
def new_job_dataset_fields():
    """The chosen dataset's column fields (htmx swaps them in when the dataset changes)."""
    fields = spec_forms.train_fields("mlp")
    form = spec_forms.FormView(fields, spec_forms.from_form(fields, request.args, partial=True))
    return _render_train(form, template="jobs/_dataset_columns.html")


def _render_predict(form: spec_forms.FormView, status: int = 200):
    return render_template("jobs/predict.html", form=form, **_choices()), status


@pages.route("/jobs/predict", methods=["GET", "POST"])
@writer_required
def new_prediction():
    """The prediction form: a model version and rows (pasted CSV or JSON, or a CSV file)."""
    fields = spec_forms.predict_fields()
    if request.method == "GET":
        spec = _clone_spec("predict")
        values = spec_forms.from_spec(fields, spec) if spec is not None else spec_forms.defaults(fields)
        if spec is None and request.args.get("model"):
            values["model"] = request.args["model"]
        return _render_predict(spec_forms.FormView(fields, values))
    form = spec_forms.FormView(fields, spec_forms.from_form(fields, request.form))
    payload, local_errors = spec_forms.to_payload(fields, form.values, "predict")
    upload = request.files.get("inputs_file")
    try:
        if upload is not None and upload.filename:
            try:
                form.values["inputs"] = upload.read().decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError("the file is not UTF-8 text") from None
        payload["inputs"] = spec_forms.parse_rows(form.values["inputs"])
    except ValueError as exc:
        local_errors["inputs"] = [str(exc)]
    job = _submit(form, payload, local_errors)
    if job is None:
        return _render_predict(form, 422)
    return redirect(url_for("pages.job", job_id=job.id))
