"""schemathesis against a real ``kiln web``: every operation of the document, as an admin, a user and a viewer.

The server (gunicorn) has a database, storage and Redis database of its own, so whatever the
generated requests create, change or disable touches no other test. Fifty throwaway users (each
with a token) are made first, so the ids that generated paths hit most (0, 1, small numbers)
belong to them: an admin's generated PATCH or a user's DELETE of a token changes a throwaway,
not the caller (valid but harmless data; no operation is skipped).
"""

from __future__ import annotations

import uuid

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings as hypothesis_settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from app.accounts import create_user
from app.db import session_scope
from app.migrate import upgrade
from tests.conftest import WebProcess, settings_env

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
EXAMPLES_PER_ROLE = 5  # per operation; derandomized, so every run sends the same requests
THROWAWAY_USERS = 50


@pytest.fixture(scope="module")
def contract_server(settings, tmp_path_factory):
    """A ``kiln web`` on its own SQLite database, storage and Redis database; yields (url, tokens by role)."""
    home = tmp_path_factory.mktemp("contract")
    database_url = f"sqlite:///{home / 'kiln.db'}"
    upgrade(database_url)
    tokens = {}
    with session_scope(database_url, write=True) as s:
        for n in range(THROWAWAY_USERS):
            create_user(session=s, email=f"throwaway{n}@example.com")
        for role in ("admin", "user", "viewer"):
            user, tokens[role] = create_user(session=s, email=f"{role}-{uuid.uuid4().hex[:6]}@example.com",
                                             is_admin=role == "admin")
            user.role = role
    env = settings_env(settings)
    env.update(KILN_DATABASE_URL=database_url, KILN_STORAGE_ROOT=str(home / "storage"),
               KILN_REDIS_URL=settings.redis_url.rsplit("/", 1)[0] + "/11",  # no worker consumes it
               KILN_MAX_INLINE_WAIT_SECONDS="1", KILN_INLINE_WAIT_SECONDS="0.5", KILN_LOG_FOLLOW_MAX_SECONDS="2")
    server = WebProcess(env, home / "web.log", workers=2).wait_ready()
    yield server.url, tokens, server.log_path
    server.stop()


def test_every_operation_conforms_for_every_role(contract_server):
    url, tokens, log_path = contract_server
    schema = schemathesis.openapi.from_url(url + "/api/v1/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 30
    failures: list[str] = []
    succeeded: set[str] = set()  # operations that answered 2xx at least once: the run reached past validation
    for operation in operations:
        for role in ("admin", "user", "viewer"):
            headers = {"Authorization": f"Bearer {tokens[role]}"}

            @hypothesis_settings(max_examples=EXAMPLES_PER_ROLE, derandomize=True, deadline=None, database=None,
                                 suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy())
            def run(case):
                response = case.call(base_url=url + "/api/v1", headers=headers, timeout=30)
                case.validate_response(response, checks=CHECKS)
                if response.status_code < 300:
                    succeeded.add(operation.label)

            try:
                run()
            except (Exception, BaseExceptionGroup) as exc:  # every operation and role runs; the report lists them all
                failures.append(f"{role} {operation.label}: {str(exc)[:1500]}")
    assert len(succeeded) >= 10, sorted(succeeded)  # the lists, the catalog, tokens, secrets, users...
    assert not failures, "\n\n".join(failures) + "\n\nserver log tail:\n" + log_path.read_text(errors="replace")[-3000:]
