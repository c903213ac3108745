"""Errors: every API error is problem+json with a documented type; ids out of range are 404/422, never 500."""

from __future__ import annotations

import logging
import re
import uuid
from pathlib import Path

import pytest
from sqlalchemy import func, select, text
from werkzeug.routing import IntegerConverter

from app.db import session_scope
from app.models import MAX_ID, Job
from app.web.problems import PROBLEM_TYPES
from tests.web.test_pages import PASSWORD, person, sign_in  # noqa: F401 (person is a fixture)

MLP = {"kind": "train", "name": "errors-mlp", "model": {"arch": "mlp"}, "dataset": {"id": "builtin:digits"},
       "hyperparameters": {"epochs": 1}}
HUGE_IDS = [99999999999999999999, 2**31, 2**63]
MISSING_IDS = [MAX_ID, 987_654]
DOCS = Path(__file__).resolve().parents[2] / "docs" / "api.md"
# A value for a path parameter that is not the id under test (none today; routes others add may have one).
FILLERS = {"UnicodeConverter": "x", "PathConverter": "x", "UUIDConverter": str(uuid.UUID(int=1)),
           "AnyConverter": None, "FloatConverter": "1.0"}


def documented_types() -> set[str]:
    """The problem ``type`` URIs listed in docs/api.md's Errors section."""
    return set(re.findall(r"`(/problems/[a-z-]+)`", DOCS.read_text()))


def assert_problem(response, status: int, slug: str) -> dict:
    """``response`` is a problem+json of kind ``slug`` with every RFC 9457 member, and no traceback."""
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/problem+json"
    body = response.get_json()
    assert {"type", "title", "status", "detail"} <= set(body), body
    assert body["status"] == status and body["title"] and body["detail"]
    assert body["type"] == f"/problems/{slug}"
    assert body["type"] in documented_types()
    assert "Traceback" not in response.get_data(as_text=True)
    return body


def job_count(settings) -> int:
    with session_scope(settings.database_url) as s:
        return s.execute(select(func.count()).select_from(Job)).scalar_one()


def id_routes(app) -> list[tuple[str, str]]:
    """``(rule, method)`` for every API route that takes an integer path parameter."""
    routes = []
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith("/api/v1/"):
            continue
        if not any(isinstance(c, IntegerConverter) for c in rule._converters.values()):
            continue
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            routes.append((rule, method))
    return routes


def build_path(rule, id_value: int) -> str:
    """The rule's path with every integer parameter set to ``id_value`` and the others to a valid value."""
    def fill(match: re.Match) -> str:
        name = match.group(2)
        converter = rule._converters[name]
        if isinstance(converter, IntegerConverter):
            return str(id_value)
        filler = FILLERS.get(type(converter).__name__)
        if filler is None:  # an <any(a, b):...> takes one of its listed words
            return next(iter(getattr(converter, "items", ["x"])), "x")
        return filler

    return re.sub(r"<(?:([a-zA-Z_]+)(?:\([^)]*\))?:)?([a-zA-Z_]+)>", fill, rule.rule)


def test_every_integer_path_parameter_is_bounded_to_the_id_range(app):
    rules = [r for r in app.url_map.iter_rules()
             if any(isinstance(c, IntegerConverter) for c in r._converters.values())]
    names = {r.endpoint for r in rules}
    assert {"api.get_job", "api.cancel_job", "api.pause_job", "api.job_metrics", "api.get_dataset"} <= names
    for rule in rules:
        for converter in rule._converters.values():
            if isinstance(converter, IntegerConverter):
                # Beyond the column's range is id 0, which no row has: a 404 like any missing id.
                assert converter.to_python(str(MAX_ID)) == MAX_ID, rule.rule
                for huge in (str(MAX_ID + 1), str(2**63), "1" + "0" * 20, "9" * 5000):
                    assert converter.to_python(huge) == 0, rule.rule


@pytest.mark.parametrize("id_value", HUGE_IDS + MISSING_IDS)
def test_every_id_route_answers_404_problem_for_an_out_of_range_or_missing_id(app, client, auth, settings, id_value):
    routes = id_routes(app)
    assert len(routes) >= 8
    before = job_count(settings)
    for rule, method in routes:
        path = build_path(rule, id_value)
        r = client.open(path, method=method, headers=auth, json={} if method in ("POST", "PUT", "PATCH") else None)
        assert r.status_code == 404, (method, path, r.status_code, r.get_data(as_text=True))
        assert_problem(r, 404, "not-found")
    assert job_count(settings) == before


def test_unicode_digits_in_a_path_are_not_an_id(client, auth):
    job = client.post("/api/v1/jobs", json=MLP, headers=auth).get_json()
    digit = str(job["id"])[-1]
    arabic = chr(0x0660 + int(digit))  # the same digit in Arabic-Indic script: int() would accept it
    assert_problem(client.get(f"/api/v1/jobs/{arabic}", headers=auth), 404, "not-found")
    assert_problem(client.get("/api/v1/jobs/\u00b2", headers=auth), 404, "not-found")


BAD_NUMBERS = ["99999999999999999999", str(2**31), str(2**63), "\u00b2", "\u0663", "1_0", " 7", "-1", "1.5"]


def test_pages_answer_404_or_400_for_out_of_range_ids_not_500(client, person):
    email, _ = person()
    sign_in(client, email, PASSWORD)
    for huge in HUGE_IDS:
        for path in (f"/jobs/{huge}", f"/jobs/{huge}/row", f"/jobs/{huge}/status"):
            assert client.get(path).status_code == 404, path
    for raw in ("99999999999999999999", str(2**31), "\u00b2", "\u0663"):
        assert client.get("/jobs", query_string={"cursor": raw}).status_code == 400, raw


@pytest.mark.parametrize("raw", BAD_NUMBERS)
def test_bad_integer_query_parameters_answer_422_naming_the_parameter(client, auth, raw):
    job = client.post("/api/v1/jobs", json=MLP, headers=auth).get_json()
    cases = [("/api/v1/jobs", "cursor"), ("/api/v1/jobs", "limit"), ("/api/v1/models", "limit"),
             (f"/api/v1/jobs/{job['id']}/metrics", "after"), (f"/api/v1/jobs/{job['id']}/metrics", "limit"),
             (f"/api/v1/jobs/{job['id']}/metrics", "points")]
    for path, name in cases:
        r = client.get(path, query_string={name: raw}, headers=auth)
        body = assert_problem(r, 422, "invalid-parameter")
        assert [e["field"] for e in body["errors"]] == [name], (path, name, body)
        assert name in body["detail"]


def test_an_in_range_cursor_still_pages(client, auth):
    job = client.post("/api/v1/jobs", json=MLP, headers=auth).get_json()
    r = client.get("/api/v1/jobs", query_string={"cursor": str(MAX_ID)}, headers=auth)
    assert r.status_code == 200 and job["id"] in [j["id"] for j in r.get_json()["items"]]
    r = client.get(f"/api/v1/jobs/{job['id']}/metrics", query_string={"after": str(MAX_ID)}, headers=auth)
    assert r.status_code == 200 and r.get_json()["items"] == []


@pytest.mark.parametrize(
    "payload,field",
    [
        ({**MLP, "dataset": {"id": "dataset:99999999999999999999"}}, "dataset.id"),
        ({**MLP, "dataset": {"id": f"dataset:{2**31}", "target": "y"}}, "dataset.id"),
        ({**MLP, "dataset": {"id": f"dataset:{MAX_ID}", "target": "y"}}, "dataset.id"),
        ({**MLP, "init_from": "99999999999999999999"}, "init_from"),
        ({**MLP, "init_from": str(2**63)}, "init_from"),
        ({**MLP, "init_from": "\u00b2"}, "init_from"),
        ({"kind": "predict", "model": "\u00b2", "inputs": [[0.0] * 64]}, "model"),
        ({"kind": "predict", "model": str(2**31), "inputs": [[0.0] * 64]}, "model"),
    ],
)
def test_out_of_range_or_unicode_refs_in_a_spec_answer_422_and_record_nothing(client, auth, settings, payload, field):
    before = job_count(settings)
    body = assert_problem(client.post("/api/v1/jobs", json=payload, headers=auth), 422, "invalid-spec")
    assert body["title"] == "Invalid job specification"
    assert any(e["field"] == field for e in body["errors"]), body
    assert job_count(settings) == before


@pytest.mark.parametrize("method,path,allowed", [
    ("DELETE", "/api/v1/jobs", {"GET", "POST"}),
    ("PUT", "/api/v1/jobs/1", {"GET"}),
    ("GET", "/api/v1/jobs/1/cancel", {"POST"}),
])
def test_405_is_problem_json_and_names_the_allowed_methods(client, auth, method, path, allowed):
    r = client.open(path, method=method, headers=auth)
    assert_problem(r, 405, "method-not-allowed")
    assert allowed <= {m.strip() for m in r.headers["Allow"].split(",")}


@pytest.mark.parametrize("path", ["/api/v1/nope", "/api/v1/jobs/1/nope", "/api/v2/jobs", "/api/"])
def test_unknown_api_routes_are_404_problem_json(client, auth, path):
    assert_problem(client.get(path, headers=auth), 404, "not-found")


def test_auth_and_state_errors_carry_their_types(client, auth):
    assert_problem(client.get("/api/v1/jobs"), 401, "unauthorized")
    job = client.post("/api/v1/jobs", json=MLP, headers=auth).get_json()
    assert client.post(f"/api/v1/jobs/{job['id']}/cancel", headers=auth).status_code == 202
    assert_problem(client.post(f"/api/v1/jobs/{job['id']}/cancel", headers=auth), 409, "conflict")
    assert_problem(client.post("/api/v1/jobs", data="not json", headers=auth), 422, "invalid-spec")


def test_an_unexpected_error_answers_a_generic_500_with_an_error_id_that_is_logged(
        client, auth, monkeypatch, caplog):
    from app.jobs import service
    from app.web.context import db

    def broken(**_):
        # A real database error: its message carries the SQL and the table name.
        db().execute(text("SELECT secret_column FROM kiln_no_such_table WHERE token = 'hunter2'"))

    monkeypatch.setattr(service, "read_job", broken)
    job_id = client.post("/api/v1/jobs", json=MLP, headers=auth).get_json()["id"]
    with caplog.at_level(logging.ERROR, logger="app.web.problems"):
        r = client.get(f"/api/v1/jobs/{job_id}", headers=auth)
    body = assert_problem(r, 500, "internal-error")
    raw = r.get_data(as_text=True)
    for leak in ("kiln_no_such_table", "secret_column", "hunter2", "SELECT", "Traceback", "sqlalchemy",
                 "OperationalError", "ProgrammingError", "UndefinedTable"):
        assert leak not in raw
    error_id = body["error_id"]
    assert re.fullmatch(r"[0-9a-f]{32}", error_id) and error_id in body["detail"]
    logged = [rec for rec in caplog.records if error_id in rec.getMessage()]
    assert logged and logged[0].exc_info is not None
    assert "kiln_no_such_table" in caplog.text  # the details are in the log, for whoever is told the id


def test_every_problem_type_is_documented_and_served(client):
    assert documented_types() == {t.uri for t in PROBLEM_TYPES.values()}
    for ptype in PROBLEM_TYPES.values():
        r = client.get(ptype.uri, headers={"Accept": "application/json"})
        assert r.status_code == 200 and r.get_json()["type"] == ptype.uri
        assert r.get_json()["title"] == ptype.title
        page = client.get(ptype.uri, headers={"Accept": "text/html"})
        assert page.status_code == 200 and ptype.title in page.get_data(as_text=True)
    assert client.get("/problems/no-such-kind").status_code == 404
