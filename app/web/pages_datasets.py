"""Dataset pages (upload with a progress bar, list, schema and first rows, delete) and the models page."""

from __future__ import annotations

from flask import Blueprint, flash, redirect, render_template, request, url_for
from flask_login import login_required

from app import catalog, datasets, model_registry, model_signals
from app.jobs.errors import Conflict, NotFound, SpecError
from app.jobs.schemas import parse_serving
from app.web.context import db, release, settings
from app.web.forms_accounts import DatasetUploadForm
from app.web.login import web_user, writer_required
from app.web.page_errors import human_bytes, install

datasets_pages = Blueprint("datasets_pages", __name__)
install(datasets_pages)


def _list_page(form: DatasetUploadForm, error: str | None = None, status: int = 200):
    uploads = datasets.list_owned(session=db(), user=web_user())
    return render_template(
        "datasets/list.html", form=form, uploads=uploads, builtins=list(catalog.BUILTIN_DATASETS.values()),
        error=error, limit=human_bytes(settings().max_upload_bytes), limit_bytes=settings().max_upload_bytes,
        human_bytes=human_bytes,
    ), status


@datasets_pages.get("/datasets")
@login_required
def datasets_list():
    """Built-in datasets, the user's uploads and (for writers) the upload form."""
    return _list_page(DatasetUploadForm())


@datasets_pages.post("/datasets")
@writer_required
def upload():
    """Store an uploaded file through the same service as ``POST /api/v1/datasets``; on to its page."""
    release()  # no transaction stays open while the body streams in (the form reads it)
    form = DatasetUploadForm()
    if not form.validate_on_submit():
        first = next(iter(form.errors.values()), ["the form is incomplete"])[0]
        return _list_page(form, str(first), 400)
    session = db()
    try:
        dataset = datasets.upload(session=session, owner=web_user(), filename=form.file.data.filename or "",
                                  data=form.file.data.stream, settings=settings(), name=form.name.data or None)
    except SpecError as exc:
        session.rollback()
        return _list_page(form, exc.errors[0]["message"], 422)
    session.commit()
    flash(f"Uploaded {dataset.name}: {dataset.num_rows} rows.")
    return redirect(url_for("datasets_pages.dataset", dataset_id=dataset.id), 303)


@datasets_pages.get("/datasets/<int:dataset_id>")
@login_required
def dataset(dataset_id: int):
    """One upload: its facts, inferred schema, first rows and the jobs that block its deletion."""
    found = datasets.get(session=db(), user=web_user(), dataset_id=dataset_id)
    return render_template(
        "datasets/detail.html", dataset=found, human_bytes=human_bytes,
        preview=datasets.preview(session=db(), user=web_user(), dataset_id=dataset_id, settings=settings()),
        using=datasets.jobs_using(session=db(), dataset=found),
    )


@datasets_pages.post("/datasets/<int:dataset_id>/delete")
@writer_required
def delete(dataset_id: int):
    """Delete an upload (refused with the blocking jobs named while any has not ended)."""
    session = db()
    try:
        datasets.delete(session=session, user=web_user(), dataset_id=dataset_id, settings=settings())
    except Conflict as exc:
        session.rollback()
        flash(str(exc), "error")
        return redirect(url_for("datasets_pages.dataset", dataset_id=dataset_id), 303)
    session.commit()
    flash(f"Dataset {dataset_id} deleted.")
    return redirect(url_for("datasets_pages.datasets_list"), 303)


@datasets_pages.get("/models")
@login_required
def models():
    """Model versions per name with their metrics, source job and a link to predict with each."""
    user = web_user()
    groups = model_registry.versions_by_name(session=db(), user=user)
    return render_template("models/list.html", groups=groups,
                           reference=lambda v: model_registry.reference(v, user))


@datasets_pages.post("/models/<name>/aliases")
@writer_required
def set_model_alias(name: str):
    """Set or move an alias of one of the user's models (form fields ``alias`` and ``version``)."""
    session = db()
    alias, version = request.form.get("alias", "").strip(), request.form.get("version", "")
    try:
        if not version.isascii() or not version.isdecimal():
            raise SpecError.at("version", "choose a version number")
        # The form sets where the alias points and whether workers load it at start; its limits stay.
        current = {a.alias: a for a in model_registry.aliases_of(session=session, owner=web_user(), name=name)}
        kept = current.get(alias)
        serving = parse_serving({"max_batch_size": kept.max_batch_size if kept else None,
                                 "max_delay_ms": kept.max_delay_ms if kept else None,
                                 "warm": request.form.get("warm") == "on"}, alias=True)
        model_registry.set_alias(session=session, owner=web_user(), name=name, alias=alias, number=int(version),
                                 serving=serving)
    except (SpecError, NotFound) as exc:
        session.rollback()
        flash(str(exc), "error")
        return redirect(url_for("datasets_pages.models"), 303)
    session.commit()
    flash(f"{name}@{alias} now names {name}@{version}.")
    return redirect(url_for("datasets_pages.models"), 303)


def _number_field(name: str):
    """A form's number field: None when blank, an int when it is digits, else the text (which validation refuses)."""
    text = request.form.get(name, "").strip()
    return None if text == "" else int(text) if text.isascii() and text.isdecimal() else text


@datasets_pages.post("/models/<name>/versions/<int:number>/serving")
@writer_required
def set_model_serving(name: str, number: int):
    """Set a version's micro-batch limits (blank fields: the global settings)."""
    session = db()
    try:
        serving = parse_serving({"max_batch_size": _number_field("max_batch_size"),
                                 "max_delay_ms": _number_field("max_delay_ms")}, alias=False)
        model_registry.set_serving(session=session, owner=web_user(), name=name, number=number, serving=serving)
    except (SpecError, NotFound) as exc:
        session.rollback()
        flash(str(exc), "error")
        return redirect(url_for("datasets_pages.models"), 303)
    session.commit()
    flash(f"Batching of {name}@{number} saved.")
    return redirect(url_for("datasets_pages.models"), 303)


@datasets_pages.post("/models/<name>/versions/<int:number>/delete")
@writer_required
def delete_model_version(name: str, number: int):
    """Delete one of the user's model versions (refused while an alias or an unfinished job uses it)."""
    session = db()
    try:
        deleted = model_registry.delete_version(session=session, owner=web_user(), name=name, number=number)
        digest = model_registry.checkpoint_digest(session=session, model=deleted)
    except (Conflict, NotFound) as exc:
        session.rollback()
        flash(str(exc), "error")
        return redirect(url_for("datasets_pages.models"), 303)
    session.commit()
    model_signals.announce_deleted(settings(), digest)
    flash(f"{name}@{number} deleted.")
    return redirect(url_for("datasets_pages.models"), 303)
