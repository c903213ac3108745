"""The server-rendered pages through Flask's test client: sign-in, CSRF, roles, the jobs list and a job's page."""

from __future__ import annotations

import os
import re
import uuid
from datetime import timedelta

import pytest

from app import storage
from app.accounts import create_user
from app.db import session_scope
from app.jobs.states import transition
from app.models import Checkpoint, Metric, utcnow

PASSWORD = "a long enough password"
MLP = {"kind": "train", "name": "page-mlp", "model": {"arch": "mlp"}, "dataset": {"id": "builtin:digits"},
       "hyperparameters": {"epochs": 1}}


def csrf_token(html: str) -> str:
    """The CSRF token of the first form on a page."""
    match = re.search(r'name="csrf_token"[^>]*value="([^"]+)"', html)
    assert match, "no CSRF token on the page"
    return match.group(1)


def sign_in(client, email: str, password: str, next_url: str | None = None):
    """Open the sign-in page and submit it, as a browser does; returns the POST's response."""
    url = "/login" + (f"?next={next_url}" if next_url else "")
    token = csrf_token(client.get(url).get_data(as_text=True))
    return client.post(url, data={"email": email, "password": password, "csrf_token": token})


@pytest.fixture
def person(database_url):
    """Factory: a committed user with a password; returns ``(email, bearer headers)``."""

    def _make(role: str = "user", active: bool = True) -> tuple[str, dict[str, str]]:
        email = f"{role}-{uuid.uuid4().hex[:10]}@example.com"
        with session_scope(database_url) as s:
            user, token = create_user(session=s, email=email, role=role, password=PASSWORD)
            user.active = active
        return email, {"Authorization": f"Bearer {token}"}

    return _make


def test_sign_in_with_the_right_password_opens_the_jobs_list(client, person):
    email, _ = person()
    response = sign_in(client, email, PASSWORD)
    assert response.status_code == 302 and response.headers["Location"] == "/jobs"
    page = client.get("/jobs").get_data(as_text=True)
    assert email in page and "Sign out" in page
    cookie = next(c for c in response.headers.getlist("Set-Cookie") if c.startswith("kiln_session="))
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie


def test_a_wrong_password_shows_an_inline_error_and_no_session(client, person):
    email, _ = person()
    response = sign_in(client, email, "not the password")
    assert response.status_code == 401
    assert "Wrong email or password" in response.get_data(as_text=True)
    assert client.get("/jobs").status_code == 302  # still signed out


def test_a_disabled_user_cannot_sign_in(client, person):
    email, _ = person(active=False)
    assert sign_in(client, email, PASSWORD).status_code == 401
    assert client.get("/jobs").status_code == 302


def test_repeated_failures_are_slowed_down_even_for_the_right_password(client, person):
    email, _ = person()
    for _ in range(5):
        assert sign_in(client, email, "wrong guess!").status_code == 401
    throttled = sign_in(client, email, PASSWORD)
    assert throttled.status_code == 429 and "Too many failed sign-ins" in throttled.get_data(as_text=True)
    assert client.get("/jobs").status_code == 302


def test_a_signed_out_visitor_goes_to_login_and_back_to_next(client, person):
    email, _ = person()
    response = client.get("/jobs?state=queued")
    assert response.status_code == 302
    assert response.headers["Location"] == "/login?next=/jobs?state%3Dqueued"
    back = sign_in(client, email, PASSWORD, next_url="/jobs?state%3Dqueued")
    assert back.status_code == 302 and back.headers["Location"] == "/jobs?state=queued"


@pytest.mark.parametrize("target", ["https://evil.example/", "//evil.example/x", "/\\evil.example", "javascript:alert(1)"])
def test_an_open_redirect_through_next_is_refused(client, person, target):
    email, _ = person()
    response = sign_in(client, email, PASSWORD, next_url=target)
    assert response.status_code == 302 and response.headers["Location"] == "/jobs"


def test_a_form_post_without_its_csrf_token_is_refused(client, person):
    email, _ = person()
    assert client.post("/login", data={"email": email, "password": PASSWORD}).status_code == 400
    assert client.get("/jobs").status_code == 302
    sign_in(client, email, PASSWORD)
    assert client.post("/logout").status_code == 400  # a cross-site page cannot sign you out
    assert client.get("/jobs").status_code == 200


def test_sign_out_ends_the_session(client, person):
    email, _ = person()
    sign_in(client, email, PASSWORD)
    token = csrf_token(client.get("/jobs").get_data(as_text=True))
    assert client.post("/logout", data={"csrf_token": token}).headers["Location"] == "/login"
    assert client.get("/jobs").status_code == 302


def test_the_jobs_list_shows_state_badges_and_polls_only_live_rows(client, person):
    email, headers = person()
    job = client.post("/api/v1/jobs", json=MLP, headers=headers).get_json()
    sign_in(client, email, PASSWORD)
    page = client.get("/jobs").get_data(as_text=True)
    row = re.search(rf'<tr id="job-{job["id"]}".*?</tr>', page, re.S).group(0)
    assert 'data-state="queued"' in row and "page-mlp" in row
    assert 'hx-trigger="every 2s"' in row and f'hx-get="/jobs/{job["id"]}/row"' in row
    token = csrf_token(client.get(f"/jobs/{job['id']}").get_data(as_text=True))
    assert client.post(f"/jobs/{job['id']}/cancel", data={"csrf_token": token}).status_code == 302
    row = client.get(f"/jobs/{job['id']}/row").get_data(as_text=True)
    assert 'data-state="cancelled"' in row and "hx-trigger" not in row  # an ended job stops polling
    filtered = client.get("/jobs?state=succeeded").get_data(as_text=True)
    assert f'id="job-{job["id"]}"' not in filtered
    assert client.get("/jobs?state=bogus").status_code == 400


def test_the_jobs_list_pages_with_an_older_link(client, person):
    email, headers = person()
    ids = [client.post("/api/v1/jobs", json=MLP, headers=headers).get_json()["id"] for _ in range(27)]
    sign_in(client, email, PASSWORD)
    first = client.get("/jobs").get_data(as_text=True)
    assert f'id="job-{ids[-1]}"' in first and f'id="job-{ids[0]}"' not in first
    older = re.search(r'<a rel="next" href="([^"]+)"', first).group(1).replace("&amp;", "&")
    second = client.get(older).get_data(as_text=True)
    assert f'id="job-{ids[0]}"' in second and f'id="job-{ids[-1]}"' not in second


def test_a_job_page_shows_its_spec_events_and_controls(client, person):
    email, headers = person()
    job = client.post("/api/v1/jobs", json=MLP, headers=headers).get_json()
    sign_in(client, email, PASSWORD)
    page = client.get(f"/jobs/{job['id']}").get_data(as_text=True)
    assert "&#34;arch&#34;: &#34;mlp&#34;" in page or '"arch": "mlp"' in page
    assert "submit" in page  # the submitted event in the timeline
    assert f'action="/jobs/{job["id"]}/cancel"' in page and "confirm(" in page
    assert f'data-metrics-url="/api/v1/jobs/{job["id"]}/metrics?scope=epoch' in page


def test_another_users_job_page_is_404(client, person):
    _, other_headers = person()
    theirs = client.post("/api/v1/jobs", json=MLP, headers=other_headers).get_json()
    email, _ = person()
    sign_in(client, email, PASSWORD)
    assert client.get(f"/jobs/{theirs['id']}").status_code == 404
    assert client.get(f"/jobs/{theirs['id']}/row").status_code == 404
    token = csrf_token(client.get("/jobs").get_data(as_text=True))
    assert client.post(f"/jobs/{theirs['id']}/cancel", data={"csrf_token": token}).status_code == 404


def test_a_viewer_sees_no_buttons_and_a_forged_post_is_403(client, person, database_url):
    _, headers = person()
    job = client.post("/api/v1/jobs", json=MLP, headers=headers).get_json()
    viewer_email, _ = person("viewer")
    sign_in(client, viewer_email, PASSWORD)
    page = client.get("/jobs").get_data(as_text=True)
    assert "viewer" in page and "/cancel" not in page
    token = csrf_token(page)
    forged = client.post(f"/jobs/{job['id']}/cancel", data={"csrf_token": token})
    assert forged.status_code == 403
    assert client.get(f"/api/v1/jobs/{job['id']}", headers=headers).get_json()["state"] == "queued"


def test_the_api_reads_with_a_browser_session_but_never_writes_with_it(client, person):
    email, _ = person()
    sign_in(client, email, PASSWORD)
    assert client.get("/api/v1/jobs").status_code == 200
    assert client.post("/api/v1/jobs", json=MLP).status_code == 401


def test_a_running_job_page_shows_elapsed_time_and_an_eta(client, person, database_url):
    email, headers = person()
    job_id = client.post("/api/v1/jobs", json=MLP, headers=headers).get_json()["id"]
    with session_scope(database_url, write=True) as s:
        assert transition(s, job_id, to="running", expect="queued",
                          values={"started_at": utcnow() - timedelta(seconds=130), "progress": 0.5})
    sign_in(client, email, PASSWORD)
    for url in (f"/jobs/{job_id}", f"/jobs/{job_id}/status"):
        text = re.sub(r"\s+", " ", client.get(url).get_data(as_text=True))
        assert re.search(r"2 min 1\d s elapsed, about 2 min( 1\d s)? left", text), url


def test_the_step_loss_chart_reads_the_downsampled_curve_with_the_session(client, person, database_url):
    email, headers = person()
    job_id = client.post("/api/v1/jobs", json=MLP, headers=headers).get_json()["id"]
    with session_scope(database_url, write=True) as s:
        for step in range(1, 1001):
            s.add(Metric(job_id=job_id, attempt=1, scope="step", epoch=1, step=step, values={"train_loss": 1 / step}))
    sign_in(client, email, PASSWORD)
    page = client.get(f"/jobs/{job_id}").get_data(as_text=True)
    url = re.search(r'id="step-loss-chart" data-metrics-url="([^"]+)"', page).group(1).replace("&amp;", "&")
    assert "scope=step" in url and "points=300" in url
    curves = client.get(url).get_json()["series"]
    assert [(c["scope"], c["name"], c["count"]) for c in curves] == [("step", "train_loss", 1000)]
    assert 4 <= len(curves[0]["points"]) <= 300 and curves[0]["points"][0][2] == 1


def test_a_checkpoint_downloads_from_its_link_with_the_session(client, person, database_url, settings):
    email, headers = person()
    job_id = client.post("/api/v1/jobs", json=MLP, headers=headers).get_json()["id"]
    data = os.urandom(50_000)
    relative = f"checkpoints/{job_id}/page-{uuid.uuid4().hex[:8]}.safetensors"
    size, digest = storage.write_atomic(settings.storage_root, relative, data)
    with session_scope(database_url, write=True) as s:
        s.add(Checkpoint(job_id=job_id, attempt=1, epoch=3, step=30, path=relative, size_bytes=size, sha256=digest))
    sign_in(client, email, PASSWORD)
    page = client.get(f"/jobs/{job_id}").get_data(as_text=True)
    link = re.search(r'<a href="([^"]+)" download\s+aria-label="Download checkpoint at epoch 3">', page)
    assert link, "no download link for the checkpoint"
    response = client.get(link.group(1))
    assert response.status_code == 200 and response.data == data


def test_the_log_section_lists_the_state_changes(client, person):
    email, headers = person()
    job_id = client.post("/api/v1/jobs", json=MLP, headers=headers).get_json()["id"]
    sign_in(client, email, PASSWORD)
    token = csrf_token(client.get(f"/jobs/{job_id}").get_data(as_text=True))
    assert client.post(f"/jobs/{job_id}/cancel", data={"csrf_token": token}).status_code == 302
    page = client.get(f"/jobs/{job_id}").get_data(as_text=True)
    log = re.search(r'<pre class="log" id="job-log"[^>]*>(.*?)</pre>', page, re.S)
    assert log, "no log section"
    lines = log.group(1).splitlines()
    assert "submitted: train job submitted" in lines[0]
    assert re.search(r" INFO attempt=- state: cancelled", lines[-1]), lines
