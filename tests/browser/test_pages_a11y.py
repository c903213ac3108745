"""Every page in a real chromium: axe-core finds nothing serious, the keyboard alone submits a job, a phone never scrolls sideways.

One ``kiln web`` and one ``kiln worker`` serve the whole module; the data (jobs in several states, a
prediction, an upload) is made through the API first. The accessibility pass saves a screenshot of
each page into ``docs/ui/`` when ``KILN_UI_SCREENSHOTS=docs/ui`` is set (``docs/ui.md`` shows them),
else into the test's temporary directory.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from app.accounts import create_user
from app.db import session_scope
from tests.browser.conftest import CHROMIUM, CHROMIUM_ARGS
from tests.conftest import ROOT

pytestmark = pytest.mark.browser

AXE = Path(__file__).parent / "vendor" / "axe-core" / "axe.min.js"
# Screenshots go to docs/ui/ (which docs/ui.md shows) only when asked for, with
# KILN_UI_SCREENSHOTS=docs/ui: a plain test run must not rewrite files in the repository.
SHOTS = (ROOT / os.environ["KILN_UI_SCREENSHOTS"]) if os.environ.get("KILN_UI_SCREENSHOTS") else None
PASSWORD = "a11y test password"
TRAIN = {"kind": "train", "name": "a11y-iris", "model": {"arch": "mlp", "hidden_sizes": [8]},
         "dataset": {"id": "builtin:iris"}, "hyperparameters": {"epochs": 3}}
CSV = b"height,weight,kind\n" + b"".join(f"{150 + i},{50 + i % 7},{'ab'[i % 2]}\n".encode() for i in range(30))
# Valid at submission, but a feature has a gap at row 3: the worker fails the job as the user's error.
GAPPY_CSV = CSV.replace(b"152,52,a", b"152,,a")
# What axe reports, reduced to what a person fixing it needs; only serious and critical ones count.
AXE_RUN = """async () => {
  const result = await axe.run(document, {resultTypes: ["violations"]});
  return result.violations.filter(v => v.impact === "serious" || v.impact === "critical").map(v => ({
    id: v.id, impact: v.impact, help: v.help, targets: v.nodes.map(n => n.target.join(" "))}));
}"""
FOCUS_RING = """() => {
  const s = getComputedStyle(document.activeElement);
  return (s.outlineStyle !== "none" && parseFloat(s.outlineWidth) > 0) || s.boxShadow !== "none";
}"""
NO_SIDEWAYS_SCROLL = "() => document.scrollingElement.scrollWidth <= window.innerWidth + 1"
# The innermost elements sticking out on the right: what to fix when a page scrolls sideways.
TOO_WIDE = """() => [...document.body.querySelectorAll("*")]
  .filter(e => e.getBoundingClientRect().right > innerWidth + 1
               && ![...e.children].some(c => c.getBoundingClientRect().right > innerWidth + 1))
  .slice(0, 5).map(e => e.tagName.toLowerCase() + (e.id ? "#" + e.id : "") + (e.className ? "." + e.className : "")
                        + " " + Math.round(e.getBoundingClientRect().right) + "px")"""


@pytest.fixture(scope="module")
def playwright():
    """Playwright's sync API for the whole module (it cannot be entered twice at once)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        yield pw


@pytest.fixture(scope="module")
def browser(playwright):
    """One headless chromium for the module; each test opens its own page."""
    chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
    yield chromium
    chromium.close()


@pytest.fixture(scope="module")
def site(web, settings, start_worker, playwright):
    """An admin with jobs queued-then-paused, cancelled, failed, succeeded, a prediction and an upload."""
    email = "ada@example.com"  # a fresh database per run; a steady name keeps the screenshots steady
    with session_scope(settings.database_url) as s:
        _, token = create_user(session=s, email=email, role="admin", password=PASSWORD)
    api = playwright.request.new_context(base_url=web, extra_http_headers={"Authorization": f"Bearer {token}"})

    def call(method: str, path: str, **kwargs) -> dict:
        response = api.fetch(path, method=method, timeout=60_000, **kwargs)
        assert response.ok, f"{method} {path}: {response.status} {response.text()}"
        return response.json()

    def wait(job_id: int, states=("succeeded", "failed", "cancelled"), timeout: float = 240) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            job = call("GET", f"/api/v1/jobs/{job_id}")
            if job["state"] in states:
                return job
            assert time.monotonic() < deadline, f"job {job_id} stuck in {job['state']}:\n{worker.log()}"
            time.sleep(0.5)

    upload = call("POST", "/api/v1/datasets", multipart={
        "file": {"name": "people.csv", "mimeType": "text/csv", "buffer": CSV}, "name": "people"})
    gappy = call("POST", "/api/v1/datasets", multipart={
        "file": {"name": "gappy.csv", "mimeType": "text/csv", "buffer": GAPPY_CSV}, "name": "gappy"})
    # Before our worker runs: one job ends up paused, one cancelled. They are long, so that even if some
    # other worker took one first, the pause or cancel lands long before its last epoch.
    long = {**TRAIN, "dataset": {"id": "builtin:digits"}, "hyperparameters": {"epochs": 500}}
    paused = call("POST", "/api/v1/jobs", data={**long, "name": "a11y-paused"})["id"]
    call("POST", f"/api/v1/jobs/{paused}/pause")
    cancelled = call("POST", "/api/v1/jobs", data={**long, "name": "a11y-cancelled"})["id"]
    call("POST", f"/api/v1/jobs/{cancelled}/cancel")
    failed = call("POST", "/api/v1/jobs", data={**TRAIN, "name": "a11y-gappy", "max_attempts": 1,
                                                "dataset": {"id": gappy["id"], "target": "kind"}})["id"]
    trained = call("POST", "/api/v1/jobs", data=TRAIN)["id"]
    worker = start_worker()
    try:
        assert wait(trained)["state"] == "succeeded"
        assert wait(failed)["state"] == "failed"
        assert wait(paused, states=("paused",))["state"] == "paused"
        assert wait(cancelled)["state"] == "cancelled"
        predicted = call("POST", "/api/v1/jobs", data={
            "kind": "predict", "name": "a11y-predict", "model": "a11y-iris@1",
            "inputs": [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]})["id"]
        assert wait(predicted)["state"] == "succeeded"
        api.dispose()
        yield {"url": web, "email": email, "worker": worker, "trained": trained, "failed": failed,
               "predicted": predicted, "paused": paused, "dataset": int(upload["id"].split(":")[1]), "token": token}
    finally:
        # The next module's first test watches a job wait queued: no worker of ours may be left.
        worker.stop()


def _sign_in(page, site) -> None:
    page.goto(site["url"] + "/login")
    page.get_by_label("Email").fill(site["email"])
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(site["url"] + "/jobs")


def test_every_page_passes_axe_and_is_photographed(site, browser, tmp_path):
    from playwright.sync_api import expect

    shots = SHOTS or tmp_path
    url = site["url"]
    found: dict[str, list[dict]] = {}

    def check(page, name: str) -> None:
        page.add_script_tag(path=str(AXE))
        found[name] = page.evaluate(AXE_RUN)
        page.screenshot(path=str(shots / f"{name}.png"))

    shots.mkdir(exist_ok=True)
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    try:
        page.set_default_timeout(30_000)
        page.goto(url + "/login")
        check(page, "login")
        _sign_in(page, site)

        expect(page.locator(f"#job-{site['failed']} .badge")).to_have_text("failed")
        expect(page.locator(f"#job-{site['paused']} .badge")).to_have_text("paused")
        check(page, "jobs")

        page.goto(f"{url}/jobs/{site['trained']}")
        expect(page.locator("#loss-chart canvas")).to_have_count(1)
        check(page, "job")
        page.goto(f"{url}/jobs/{site['failed']}")
        expect(page.locator("#job-status .error")).to_contain_text("has no value at row 3")
        check(page, "job-failed")
        page.goto(f"{url}/jobs/{site['paused']}")
        expect(page.get_by_role("button", name="Resume")).to_be_visible()
        check(page, "job-paused")
        page.goto(f"{url}/jobs/{site['predicted']}")
        expect(page.locator("table.predictions td.predicted-class")).to_have_count(2)
        check(page, "prediction")

        page.goto(url + "/jobs/new")
        check(page, "new-job")
        page.get_by_label("Name", exact=True).fill("a11y-error")
        page.get_by_label("Dataset", exact=True).select_option("builtin:iris")
        page.get_by_label("Epochs", exact=True).fill("0")
        page.get_by_role("button", name="Submit training job").click()
        expect(page.locator("#f-hyperparameters-epochs-error")).to_contain_text("greater than or equal to 1")
        check(page, "new-job-error")

        page.goto(url + "/jobs/predict")
        check(page, "predict")

        page.goto(url + "/datasets")
        check(page, "datasets")
        # The upload form answering a file it cannot read: the message stands by the form.
        page.get_by_label("File", exact=False).set_input_files(
            files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not a table"}])
        page.locator("#upload-form").evaluate("f => f.submit()")  # the plain post, as without JavaScript
        expect(page.get_by_label("File", exact=False)).to_have_accessible_description(re.compile("unsupported format"))
        check(page, "upload")
        page.goto(f"{url}/datasets/{site['dataset']}")
        check(page, "dataset")
        page.goto(url + "/models")
        check(page, "models")
        page.get_by_role("link", name="Predict with this model a11y-iris@1").click()
        page.wait_for_url(f"{url}/jobs/predict?model=*")
        expect(page.get_by_label("Model version")).to_have_value(re.compile(r"a11y-iris@1$"))

        page.goto(url + "/admin")
        expect(page.locator("#jobs-by-state")).to_be_visible()
        check(page, "admin")
        page.goto(url + "/admin/users")
        check(page, "admin-users")

        page.goto(url + "/account")
        page.get_by_label("Token name").fill("laptop")
        page.get_by_role("button", name="Create token").click()
        expect(page.locator("#new-token")).to_be_visible()
        check(page, "account")

        page.goto(url + "/jobs/999999999")
        expect(page.get_by_role("heading", level=1)).to_contain_text("404")
        check(page, "not-found")
    finally:
        page.close()

    report = [f"{name}: [{v['impact']}] {v['id']}: {v['help']}\n    " + "\n    ".join(v["targets"])
              for name, violations in found.items() for v in violations]
    assert not report, "axe-core found serious or critical violations:\n" + "\n".join(report)
    assert len(found) == 17


def test_a_person_submits_a_training_job_with_the_keyboard_alone(site, browser):
    from playwright.sync_api import expect

    url = site["url"]
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    try:
        page.set_default_timeout(30_000)
        rings: dict[str, bool] = {}

        def tab_to(selector: str, limit: int = 80) -> None:
            """Press Tab until ``selector`` has focus, noting whether each link or button showed a ring."""
            target = page.locator(selector)
            for _ in range(limit):
                page.keyboard.press("Tab")
                tag = page.evaluate("document.activeElement.tagName")
                if tag in ("A", "BUTTON"):
                    rings[page.evaluate("document.activeElement.textContent.trim()")] = page.evaluate(FOCUS_RING)
                if target.evaluate("e => e === document.activeElement"):
                    return
            raise AssertionError(f"{selector} never got the focus in {limit} presses of Tab")

        page.goto(url + "/login")
        expect(page.locator("#email")).to_be_focused()  # autofocus
        page.keyboard.type(site["email"])
        page.keyboard.press("Tab")
        page.keyboard.type(PASSWORD)
        page.keyboard.press("Enter")
        page.wait_for_url(url + "/jobs")

        # The first Tab reaches the skip link, then the navigation.
        tab_to("a.skip")
        expect(page.locator("a.skip")).to_be_in_viewport()
        tab_to("nav >> text=New training job")
        page.keyboard.press("Enter")
        page.wait_for_url(url + "/jobs/new")

        tab_to("#f-name")
        page.keyboard.type("keyboard-iris")
        tab_to("#f-dataset-id")
        # A focused closed select takes letters: "ir" picks the iris dataset.
        page.keyboard.type("ir")
        expect(page.locator("#f-dataset-id")).to_have_value("builtin:iris")
        tab_to("#f-model-hidden-sizes")
        page.keyboard.press("Control+A")
        page.keyboard.type("8")
        tab_to("#f-hyperparameters-epochs")
        page.keyboard.press("Control+A")
        page.keyboard.type("2")
        tab_to("form.spec > button[type=submit]:not(.default-submit)")
        page.keyboard.press("Space")

        page.wait_for_url(f"{url}/jobs/*")
        expect(page.get_by_role("heading", level=1)).to_contain_text("keyboard-iris")
        expect(page.locator("#job-status .badge")).to_have_text("succeeded", timeout=240_000)
    finally:
        page.close()

    assert {"Skip to content", "New training job", "Show fields", "Submit training job"} <= set(rings), rings
    assert all(rings.values()), f"focused without a visible ring: {[k for k, v in rings.items() if not v]}"


def test_pages_fit_a_phone_without_sideways_scrolling(site, browser, tmp_path):
    from playwright.sync_api import expect

    url = site["url"]
    page = browser.new_page(viewport={"width": 360, "height": 740})
    try:
        page.set_default_timeout(30_000)
        _sign_in(page, site)
        wide = []
        for path in ("/jobs", f"/jobs/{site['trained']}", f"/jobs/{site['failed']}", f"/jobs/{site['predicted']}",
                     "/jobs/new", "/jobs/predict", "/datasets", f"/datasets/{site['dataset']}", "/models",
                     "/admin", "/admin/users", "/account"):
            page.goto(url + path)
            if path == f"/jobs/{site['trained']}":
                expect(page.locator("#loss-chart canvas")).to_have_count(1)
            if not page.evaluate(NO_SIDEWAYS_SCROLL):
                wide.append((path, page.evaluate("document.scrollingElement.scrollWidth"), page.evaluate(TOO_WIDE)))
        page.goto(url + "/jobs")
        page.screenshot(path=str((SHOTS or tmp_path) / "jobs-phone.png"))
    finally:
        page.close()
    assert not wide, f"wider than a 360 px screen: {wide}"
