"""Model references: a name belongs to its owner; admins name others' models as ``owner/name``."""

from __future__ import annotations

import uuid

import pytest

from app.accounts import create_user
from app.jobs.errors import SpecError
from app.jobs.service import resolve_model
from app.models import Checkpoint, Job, ModelVersion


def _user(session, admin: bool = False, email: str | None = None):
    email = email or f"ref-{uuid.uuid4().hex[:10]}@example.com"
    return create_user(session=session, email=email, is_admin=admin)[0]


def _model(session, owner, name: str, version: int) -> ModelVersion:
    job = Job(owner_id=owner.id, kind="train", name=name, state="succeeded", queue="train", spec={})
    session.add(job)
    session.flush()
    ckpt = Checkpoint(job_id=job.id, attempt=1, epoch=1, step=1, path=f"jobs/{job.id}/c", size_bytes=1, sha256="0" * 64)
    session.add(ckpt)
    session.flush()
    model = ModelVersion(owner_id=owner.id, name=name, version=version, job_id=job.id, checkpoint_id=ckpt.id,
                         arch="mlp", task="classification", signature={}, metrics={})
    session.add(model)
    session.flush()
    return model


@pytest.fixture
def two_owners(session):
    """An admin with X@1, and a user with X@1..3 (newer version numbers than the admin's)."""
    admin = _user(session, admin=True)
    # An email with a "/" in its local part is valid; the last "/" still ends the owner.
    user = _user(session, email=f"a/b-{uuid.uuid4().hex[:8]}@example.com")
    mine = _model(session, admin, "X", 1)
    theirs = [_model(session, user, "X", v) for v in (1, 2, 3)]
    return admin, user, mine, theirs


def test_an_admins_own_name_resolves_to_the_admins_model_not_a_higher_version_of_anyone_else(session, two_owners):
    admin, user, mine, theirs = two_owners
    for ref in ("X", "X@latest", "X@1"):
        assert resolve_model(session=session, user=admin, ref=ref).id == mine.id
    with pytest.raises(SpecError):
        resolve_model(session=session, user=admin, ref="X@3")  # version 3 exists, but not the admin's


def test_an_admin_names_another_owners_model_by_email_or_id(session, two_owners):
    admin, user, _, theirs = two_owners
    assert resolve_model(session=session, user=admin, ref=f"{user.email}/X@latest").id == theirs[2].id
    assert resolve_model(session=session, user=admin, ref=f"{user.email.upper()}/X@2").id == theirs[1].id
    assert resolve_model(session=session, user=admin, ref=f"{user.id}/X").id == theirs[2].id
    assert resolve_model(session=session, user=admin, ref=str(theirs[0].job_id)).id == theirs[0].id
    with pytest.raises(SpecError, match="no user"):
        resolve_model(session=session, user=admin, ref="nobody@example.com/X@latest")


def test_a_user_resolves_only_their_own_models(session, two_owners):
    admin, user, mine, theirs = two_owners
    assert resolve_model(session=session, user=user, ref="X@latest").id == theirs[2].id
    assert resolve_model(session=session, user=user, ref=f"{user.email}/X@1").id == theirs[0].id
    # Another owner's prefix is refused in the same words whether or not that owner exists.
    refusals = []
    for ref in (f"{admin.email}/X@latest", f"{admin.id}/X", "nobody@example.com/X"):
        with pytest.raises(SpecError) as caught:
            resolve_model(session=session, user=user, ref=ref)
        refusals.append(caught.value.errors[0]["message"].split("'")[-1])
    assert len(set(refusals)) == 1
    with pytest.raises(SpecError):
        resolve_model(session=session, user=user, ref=str(mine.job_id))  # the admin's job id


@pytest.mark.parametrize("ref", [
    "²", "X@²", "٣", "X@٣", "99999999999999999999", "X@99999999999999999999", "2147483648", "X@-1", "X@",
    "X@1.0", "/X", "0",
])
def test_odd_numbers_are_a_spec_error_not_a_crash(session, two_owners, ref):
    admin, user, _, _ = two_owners
    for who in (admin, user):
        with pytest.raises(SpecError) as caught:
            resolve_model(session=session, user=who, ref=ref, field="init_from")
        assert caught.value.errors[0]["field"] == "init_from"
