"""One person's steps in a real headless chromium against a real ``kiln web`` and a real ``kiln worker``."""

from __future__ import annotations

import json
import re
import urllib.request
import uuid

import pytest

from app.accounts import create_user
from app.db import session_scope
from tests.browser.conftest import CHROMIUM, CHROMIUM_ARGS
from tests.conftest import submit_unpublished

pytestmark = pytest.mark.browser

PASSWORD = "browser test password"
EPOCHS = 3
SPEC = {"kind": "train", "name": "browser-mlp", "model": {"arch": "mlp"}, "dataset": {"id": "builtin:digits"},
        "hyperparameters": {"epochs": EPOCHS}}
# The first test's job: it runs for several of the list's 2 s polls (about 10 s on a quiet machine;
# longer under load), so its row is seen running between queued and succeeded.
WATCHED_EPOCHS = 80


def test_a_person_signs_in_and_watches_a_training_job_finish(web, settings, start_worker, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    email = f"browser-{uuid.uuid4().hex[:8]}@example.com"
    with session_scope(settings.database_url) as s:
        _, token = create_user(session=s, email=email, role="user", password=PASSWORD)

    worker = None
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.set_default_timeout(30_000)

            # Sign in: the jobs list asks for it first, then comes back.
            page.goto(web + "/jobs")
            expect(page).to_have_url(f"{web}/login?next=/jobs")
            page.get_by_label("Email").fill(email)
            page.get_by_label("Password").fill(PASSWORD)
            page.get_by_role("button", name="Sign in").click()
            expect(page).to_have_url(web + "/jobs")
            expect(page.get_by_text("No jobs")).to_be_visible()

            # Submit a small training job through the API; no worker is running yet, so it waits queued.
            watched = SPEC | {"hyperparameters": {"epochs": WATCHED_EPOCHS}}
            request = urllib.request.Request(
                web + "/api/v1/jobs", data=json.dumps(watched).encode(), method="POST",
                headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            )
            job_id = json.load(urllib.request.urlopen(request, timeout=30))["id"]
            page.reload()
            badge = page.locator(f"#job-{job_id} .badge")
            expect(badge).to_have_text("queued")
            page.evaluate("window.__noReload = true")
            page.screenshot(path=str(tmp_path / "jobs-queued.png"), full_page=True)

            # A worker starts; the row's badge moves to running, then succeeded, by htmx polling alone.
            worker = start_worker()
            expect(badge).to_have_text("running", timeout=240_000)
            expect(badge).to_have_text("succeeded", timeout=240_000)
            assert page.evaluate("window.__noReload === true"), "the page was reloaded"
            assert page.locator(f"#job-{job_id}").get_attribute("hx-trigger") is None  # polling stopped
            page.screenshot(path=str(tmp_path / "jobs-succeeded.png"), full_page=True)

            # The job's page draws its loss curve: one point per finished epoch.
            page.get_by_role("link", name=f"#{job_id} browser-mlp").click()
            expect(page).to_have_url(f"{web}/jobs/{job_id}")
            expect(page.locator("#job-status .badge")).to_have_text("succeeded")
            expect(page.locator("#loss-chart canvas")).to_have_count(1)
            expect(page.locator("#loss-chart")).to_have_attribute("data-points", str(WATCHED_EPOCHS))
            expect(page.locator("#step-loss-chart canvas")).to_have_count(1)  # the per-step curve, downsampled
            expect(page.get_by_role("heading", name="Loss per step")).to_be_visible()
            expect(page.get_by_role("heading", name="Checkpoints")).to_be_visible()
            page.screenshot(path=str(tmp_path / "job.png"), full_page=True)
        finally:
            browser.close()
            if worker is not None:  # the next test's jobs go to its own worker only
                worker.stop()


def test_a_person_trains_and_predicts_through_the_forms(web, settings, start_worker, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    email = f"forms-{uuid.uuid4().hex[:8]}@example.com"
    with session_scope(settings.database_url) as s:
        _, token = create_user(session=s, email=email, role="user", password=PASSWORD)
    worker = start_worker()

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.set_default_timeout(30_000)
            page.goto(web + "/login")
            page.get_by_label("Email").fill(email)
            page.get_by_label("Password").fill(PASSWORD)
            page.get_by_role("button", name="Sign in").click()

            # The training form: a bad epoch count comes back with the API's message next to the field.
            page.get_by_role("link", name="New training job").click()
            page.get_by_label("Name", exact=True).fill("form-iris")
            page.get_by_label("Dataset", exact=True).select_option("builtin:iris")
            page.get_by_label("Hidden sizes").fill("16")
            page.get_by_label("Epochs", exact=True).fill("0")
            page.screenshot(path=str(tmp_path / "new-job.png"), full_page=True)
            page.get_by_role("button", name="Submit training job").click()
            expect(page.locator("#f-hyperparameters-epochs-error")).to_contain_text("greater than or equal to 1")
            expect(page.get_by_label("Name", exact=True)).to_have_value("form-iris")
            expect(page.get_by_label("Hidden sizes")).to_have_value("16")
            page.locator("#f-hyperparameters-epochs-field").screenshot(path=str(tmp_path / "new-job-error.png"))

            # Fixed, it lands on the job's page and trains to the end.
            page.get_by_label("Epochs", exact=True).fill("2")
            page.get_by_role("button", name="Submit training job").click()
            expect(page).to_have_url(re.compile(rf"{re.escape(web)}/jobs/\d+$"))
            expect(page.locator("#job-status .badge")).to_have_text("succeeded", timeout=240_000)

            # A prediction of one pasted row: the results table shows the predicted class.
            page.get_by_role("link", name="New prediction").click()
            page.get_by_label("Model version").select_option("form-iris@1")
            page.get_by_label("Rows", exact=True).fill("sepal length,sepal width,petal length,petal width\n5.1,3.5,1.4,0.2\n")
            page.screenshot(path=str(tmp_path / "predict.png"), full_page=True)
            page.get_by_role("button", name="Submit prediction").click()
            expect(page).to_have_url(re.compile(rf"{re.escape(web)}/jobs/\d+$"))
            expect(page.locator("#job-status .badge")).to_have_text("succeeded", timeout=120_000)
            job_id = page.url.rsplit("/", 1)[1]
            request = urllib.request.Request(f"{web}/api/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {token}"})
            predicted = json.load(urllib.request.urlopen(request, timeout=30))["result"]["predictions"][0]["class"]
            expect(page.locator("table.predictions td.predicted-class").first).to_have_text(str(predicted))
            page.screenshot(path=str(tmp_path / "prediction.png"), full_page=True)
        finally:
            browser.close()
            worker.stop()


def test_a_person_cancels_a_running_job_from_its_page(web, settings, start_worker, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    email = f"cancel-{uuid.uuid4().hex[:8]}@example.com"
    with session_scope(settings.database_url) as s:
        _, token = create_user(session=s, email=email, role="user", password=PASSWORD)
    # Long enough to be surely running when the button is clicked; the cancel ends it early.
    long_spec = SPEC | {"name": "browser-long", "hyperparameters": {"epochs": 5000}}
    request = urllib.request.Request(
        web + "/api/v1/jobs", data=json.dumps(long_spec).encode(), method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    job_id = json.load(urllib.request.urlopen(request, timeout=30))["id"]
    worker = start_worker()

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.set_default_timeout(30_000)
            page.goto(f"{web}/login?next=/jobs/{job_id}")
            page.get_by_label("Email").fill(email)
            page.get_by_label("Password").fill(PASSWORD)
            page.get_by_role("button", name="Sign in").click()
            expect(page).to_have_url(f"{web}/jobs/{job_id}")
            badge = page.locator("#job-status .badge")
            expect(badge).to_have_text("running", timeout=240_000)

            # Cancel asks for confirmation; the job stops at its next step and the badge follows by polling.
            page.once("dialog", lambda dialog: dialog.accept())
            page.locator("#job-status").get_by_role("button", name="Cancel").click()
            expect(page.get_by_text(f"Job {job_id}: cancel requested.")).to_be_visible()
            page.evaluate("window.__noReload = true")
            expect(badge).to_have_text("cancelled", timeout=120_000)
            assert page.evaluate("window.__noReload === true"), "the page was reloaded"
            expect(page.locator("#job-status").get_by_role("button", name="Retry")).to_be_visible()
            page.reload()  # the log section is drawn with the page, not polled
            expect(page.locator("#job-log")).to_contain_text("state: cancelled")
            page.screenshot(path=str(tmp_path / "job-cancelled.png"), full_page=True)
        finally:
            browser.close()
            worker.stop()


def test_polls_of_an_unchanged_job_are_304s_and_a_change_still_shows(web, settings, tmp_path):
    """The browser revalidates the htmx polls on its own (If-None-Match from its cache): the server
    answers an unchanged row or status panel with 304, and a change still reaches the page."""
    from playwright.sync_api import expect, sync_playwright

    email = f"polls-{uuid.uuid4().hex[:8]}@example.com"
    with session_scope(settings.database_url) as s:
        user, token = create_user(session=s, email=email, role="user", password=PASSWORD)
        s.flush()
        user_id = user.id
    job_id = submit_unpublished(settings, user_id, SPEC)  # stays queued: nothing changes it until we do

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.set_default_timeout(30_000)
            # What went over the wire, from Chromium's network layer (a page sees a revalidated 304 as a 200).
            urls: dict[str, str] = {}
            codes: dict[str, int] = {}
            network = page.context.new_cdp_session(page)
            network.send("Network.enable")
            network.on("Network.requestWillBeSent", lambda e: urls.__setitem__(e["requestId"], e["request"]["url"]))
            network.on("Network.responseReceivedExtraInfo", lambda e: codes.__setitem__(e["requestId"], e["statusCode"]))

            def answered(url: str, status: int, count: int) -> None:
                """Wait until ``url`` got ``count`` answers with ``status`` on the wire."""
                for _ in range(240):
                    if sum(1 for rid, u in urls.items() if u == url and codes.get(rid) == status) >= count:
                        return
                    page.wait_for_timeout(250)
                seen = [(u.rsplit("/", 2)[-1], codes.get(rid)) for rid, u in urls.items() if u == url]
                raise AssertionError(f"{url}: wanted {count} x {status}, the wire saw {seen}")

            page.goto(f"{web}/login?next=/jobs")
            page.get_by_label("Email").fill(email)
            page.get_by_label("Password").fill(PASSWORD)
            page.get_by_role("button", name="Sign in").click()
            expect(page.locator(f"#job-{job_id} .badge")).to_have_text("queued")
            answered(f"{web}/jobs/{job_id}/row", 304, 2)  # the list's row, polled every 2 s

            page.get_by_role("link", name=f"#{job_id} browser-mlp").click()
            badge = page.locator("#job-status .badge")
            expect(badge).to_have_text("queued")
            answered(f"{web}/jobs/{job_id}/status", 304, 2)
            page.evaluate("window.__noReload = true")

            # The job changes (paused through the API): the next poll brings it, without a reload.
            request = urllib.request.Request(web + f"/api/v1/jobs/{job_id}/pause", method="POST",
                                             headers={"Authorization": f"Bearer {token}"})
            assert urllib.request.urlopen(request, timeout=30).status == 202
            expect(badge).to_have_text("paused")
            expect(page.locator("#job-status").get_by_role("button", name="Resume")).to_be_visible()
            assert page.evaluate("window.__noReload === true"), "the page was reloaded"
            answered(f"{web}/jobs/{job_id}/status", 200, 2)  # the first poll, then the changed one
            page.screenshot(path=str(tmp_path / "job-paused-by-poll.png"), full_page=True)
        finally:
            browser.close()


def test_roles_and_csrf_hold_in_the_browser(web, settings, tmp_path):
    """A user is refused the admin dashboard and another user's job (404); a viewer sees no submit
    or cancel controls and a forged cancel is refused (403); a form POST without its CSRF token is
    refused (400) while the same POST with it works."""
    from playwright.sync_api import expect, sync_playwright

    people = {}
    with session_scope(settings.database_url) as s:
        for role in ("user", "user", "viewer"):
            email = f"{role}-{uuid.uuid4().hex[:8]}@example.com"
            person, _ = create_user(session=s, email=email, role=role, password=PASSWORD)
            s.flush()
            people.setdefault(role, []).append((email, person.id))
    (owner, owner_id), (other, _) = people["user"]
    viewer, viewer_id = people["viewer"][0]
    owners_job = submit_unpublished(settings, owner_id, SPEC | {"name": "owners-job"})  # stays queued
    viewers_job = submit_unpublished(settings, viewer_id, SPEC | {"name": "viewers-job"})

    def state_of(job_id: int) -> str:
        from app.models import Job

        with session_scope(settings.database_url) as s:
            return s.get(Job, job_id).state

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            def signed_in(email: str):
                page = browser.new_context(viewport={"width": 1100, "height": 900}).new_page()
                page.set_default_timeout(30_000)
                page.goto(web + "/login")
                page.get_by_label("Email").fill(email)
                page.get_by_label("Password").fill(PASSWORD)
                page.get_by_role("button", name="Sign in").click()
                expect(page.get_by_role("button", name="Sign out")).to_be_visible()
                return page

            # Another user: no dashboard, and the owner's job does not exist for them.
            page = signed_in(other)
            for path in ("/admin", f"/jobs/{owners_job}"):
                answer = page.goto(web + path)
                assert answer.status == 404, (path, answer.status)
                expect(page.get_by_role("heading", level=1)).to_contain_text("404")
            page.context.close()

            # A viewer: no way to submit, no job controls, and a forged cancel is refused.
            page = signed_in(viewer)
            page.goto(web + "/jobs")
            expect(page.get_by_role("link", name="New training job")).to_have_count(0)
            expect(page.get_by_role("link", name="New prediction")).to_have_count(0)
            page.goto(f"{web}/jobs/{viewers_job}")
            expect(page.locator("#job-status .badge")).to_have_text("queued")
            expect(page.locator("#job-status").get_by_role("button")).to_have_count(0)
            token = page.locator('input[name="csrf_token"]').first.get_attribute("value") or page.evaluate(
                "document.querySelector('meta[name=csrf-token]')?.content")
            assert token, "no CSRF token on the viewer's page to forge a cancel with"
            forged = page.request.post(f"{web}/jobs/{viewers_job}/cancel", form={"csrf_token": token},
                                       max_redirects=0)
            assert forged.status == 403, forged.status
            assert state_of(viewers_job) == "queued"
            page.context.close()

            # The owner: a cancel without its CSRF token is refused; the page's own form works.
            page = signed_in(owner)
            page.goto(f"{web}/jobs/{owners_job}")
            expect(page.locator("#job-status .badge")).to_have_text("queued")
            refused = page.request.post(f"{web}/jobs/{owners_job}/cancel", form={}, max_redirects=0)
            assert refused.status == 400, refused.status
            assert state_of(owners_job) == "queued"
            page.once("dialog", lambda dialog: dialog.accept())
            page.locator("#job-status").get_by_role("button", name="Cancel").click()
            expect(page.locator("#job-status .badge")).to_have_text("cancelled")
            assert state_of(owners_job) == "cancelled"
            page.screenshot(path=str(tmp_path / "roles-owner-cancelled.png"), full_page=True)
        finally:
            browser.close()
