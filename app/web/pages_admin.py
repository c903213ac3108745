"""Admin pages: the dashboard ``/admin`` (its panel re-fetched by htmx, writing nothing) and ``/admin/users``.

Everyone but an admin gets 404 here, as in the API's admin routes.
"""

from __future__ import annotations

from flask import Blueprint, flash, redirect, render_template, url_for

from app import accounts
from app.jobs import overview
from app.jobs.errors import Conflict, SpecError
from app.web import conditional
from app.web.context import db
from app.web.forms_accounts import NewUserForm, UserUpdateForm
from app.web.login import admin_required, web_user
from app.web.page_errors import install

admin_pages = Blueprint("admin_pages", __name__)
install(admin_pages)

POLL_SECONDS = 5


@admin_pages.get("/admin")
@admin_required
def dashboard():
    """Jobs by state, queues, workers, running jobs, recent failures and usage per user."""
    tag, version = conditional.overview_tag()
    return render_template("admin/dashboard.html", data=conditional.shared_overview(version), poll=POLL_SECONDS,
                           recount=overview.RECOUNT_SECONDS, version=tag)


@admin_pages.get("/admin/overview")
@admin_required
def overview_panel():
    """The dashboard's panel alone (htmx polls it every few seconds; a read-only request, 304 while
    nothing changed, and one computation per change shared by every open dashboard)."""
    tag, version = conditional.overview_tag()
    return conditional.answer(tag, lambda: render_template(
        "admin/_overview.html", data=conditional.shared_overview(version), poll=POLL_SECONDS,
        recount=overview.RECOUNT_SECONDS, version=tag))


def _users_page(form: NewUserForm, *, error: str | None = None, new_token: str | None = None,
                created: str | None = None, status: int = 200):
    users = accounts.list_users(session=db(), actor=web_user())
    return render_template("admin/users.html", form=form, users=users, roles=accounts.ROLES, error=error,
                           new_token=new_token, created=created), status


@admin_pages.get("/admin/users")
@admin_required
def users():
    """Every account with its role and whether it is enabled, and a form to add one."""
    return _users_page(NewUserForm())


@admin_pages.post("/admin/users")
@admin_required
def create_user():
    """Create a user with a role and an initial password (the same service as ``POST /api/v1/users``)."""
    form = NewUserForm()
    if not form.validate_on_submit():
        field, messages = next(iter(form.errors.items()), ("form", ["the form is incomplete"]))
        return _users_page(form, error=f"{field}: {messages[0]}", status=400)
    session = db()
    try:
        user, plain = accounts.add_user(session=session, actor=web_user(), email=form.email.data,
                                        role=form.role.data, password=form.password.data)
    except (SpecError, Conflict) as exc:
        session.rollback()
        message = exc.errors[0]["message"] if isinstance(exc, SpecError) else str(exc)
        return _users_page(form, error=message, status=422 if isinstance(exc, SpecError) else 409)
    email = user.email
    session.commit()
    return _users_page(NewUserForm(formdata=None), new_token=plain, created=email, status=201)


@admin_pages.post("/admin/users/<int:user_id>")
@admin_required
def update_user(user_id: int):
    """Set a user's role and enabled flag; self-disable and removing the last admin are refused."""
    form = UserUpdateForm()
    if not form.validate_on_submit():
        flash("Choose a role (admin, user or viewer).", "error")
        return redirect(url_for("admin_pages.users"), 303)
    session = db()
    try:
        user = accounts.update_user(session=session, actor=web_user(), user_id=user_id, role=form.role.data,
                                    active=form.active.data)
    except Conflict as exc:
        session.rollback()
        flash(str(exc), "error")
        return redirect(url_for("admin_pages.users"), 303)
    session.commit()
    flash(f"{user.email}: {user.role}, {'enabled' if user.active else 'disabled'}.")
    return redirect(url_for("admin_pages.users"), 303)
