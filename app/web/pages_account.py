"""``/account``: a person's own API tokens (list, create with the secret shown once, revoke); every role may."""

from __future__ import annotations

from flask import Blueprint, flash, redirect, render_template, url_for
from flask_login import login_required

from app import accounts
from app.jobs.errors import SpecError
from app.web.context import db
from app.web.forms import ActionForm
from app.web.forms_accounts import TokenForm
from app.web.login import web_user
from app.web.page_errors import install

account_pages = Blueprint("account_pages", __name__)
install(account_pages)


def _page(form: TokenForm, *, new_token: str | None = None, error: str | None = None, status: int = 200):
    tokens = accounts.list_tokens(session=db(), user=web_user())
    return render_template("account/tokens.html", form=form, tokens=tokens, new_token=new_token, error=error,
                           status_of=accounts.token_status), status


@account_pages.get("/account")
@login_required
def account():
    """Who you are and your API tokens."""
    return _page(TokenForm())


@account_pages.post("/account/tokens")
@login_required
def create_token():
    """Create a token; the page answering the POST is the only place its secret is ever shown."""
    form = TokenForm()
    if not form.validate_on_submit():
        first = next(iter(form.errors.values()), ["the form is incomplete"])[0]
        return _page(form, error=str(first), status=400)
    session = db()
    try:
        # "Valid through" a day, read the same way as the API's date form.
        expires_at = accounts.parse_expiry(form.expires_on.data.isoformat() if form.expires_on.data else None)
        _, plain = accounts.create_token(session=session, user=web_user(), name=form.name.data,
                                         expires_at=expires_at)
    except SpecError as exc:
        session.rollback()
        return _page(form, error=exc.errors[0]["message"], status=422)
    session.commit()
    # Rendered, not redirected: a redirect would need the secret in the session cookie or the URL.
    return _page(TokenForm(formdata=None), new_token=plain, status=201)


@account_pages.post("/account/tokens/<int:token_id>/revoke")
@login_required
def revoke_token(token_id: int):
    """Revoke one of your tokens (another person's answers 404)."""
    if not ActionForm().validate_on_submit():
        return redirect(url_for("account_pages.account"), 303)
    session = db()
    token = accounts.revoke_token(session=session, user=web_user(), token_id=token_id)
    session.commit()
    flash(f"Token {token.name} ({token.prefix}…) revoked.")
    return redirect(url_for("account_pages.account"), 303)
