"""Flask-WTF forms of the dataset, account and user administration pages; every one carries a CSRF token."""

from __future__ import annotations

from flask_wtf import FlaskForm
from flask_wtf.file import FileField, FileRequired
from wtforms import BooleanField, DateField, PasswordField, SelectField, StringField
from wtforms.validators import DataRequired, Length, Optional

from app.accounts import MAX_PASSWORD_LENGTH, MAX_TOKEN_NAME, MIN_PASSWORD_LENGTH, ROLES


class DatasetUploadForm(FlaskForm):
    """A CSV, JSON Lines or Parquet file and an optional name."""

    file = FileField("File (CSV, JSON Lines or Parquet)", validators=[FileRequired("choose a file to upload")])
    name = StringField("Name (optional)", validators=[Optional(), Length(max=200)])


class TokenForm(FlaskForm):
    """A new API token: a name and an optional last day of validity."""

    name = StringField("Token name", validators=[DataRequired(), Length(max=MAX_TOKEN_NAME)])
    expires_on = DateField("Valid through (optional, UTC)", validators=[Optional()])


class NewUserForm(FlaskForm):
    """An admin creates a user."""

    email = StringField("Email", validators=[DataRequired(), Length(max=320)])
    role = SelectField("Role", choices=list(ROLES), default="user")
    password = PasswordField("Initial password", validators=[
        DataRequired(), Length(min=MIN_PASSWORD_LENGTH, max=MAX_PASSWORD_LENGTH)])


class UserUpdateForm(FlaskForm):
    """An admin sets a user's role and whether the account is enabled."""

    role = SelectField("Role", choices=list(ROLES))
    active = BooleanField("Enabled")
