"""The submission forms through Flask's test client, CSRF on: what a browser without JavaScript would post."""

from __future__ import annotations

import html
import io
import re
import uuid
from html.parser import HTMLParser

import pytest
from werkzeug.datastructures import MultiDict

from app.db import session_scope
from app.jobs.schemas import parse_spec
from app.models import Checkpoint, Job, ModelVersion, User
from tests.web.test_pages import PASSWORD, csrf_token, person, sign_in  # noqa: F401 - person is a fixture

CLASSES = ["setosa", "versicolor", "virginica"]


class _FormReader(HTMLParser):
    """What a browser submits from a page's ``form.spec``: named inputs, ticked boxes and text areas."""

    def __init__(self):
        super().__init__()
        self.data: list[tuple[str, str]] = []
        self.inside = False
        self.textarea: str | None = None
        self.text = ""

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "form" and "spec" in (a.get("class") or ""):
            self.inside = True
        if not self.inside:
            return
        if tag == "input" and a.get("name") and a.get("type") not in ("submit", "file"):
            if a.get("type") != "checkbox" or "checked" in a:
                self.data.append((a["name"], a.get("value") or ""))
        elif tag == "textarea":
            self.textarea, self.text = a.get("name"), ""

    def handle_data(self, data):
        if self.textarea is not None:
            self.text += data

    def handle_endtag(self, tag):
        if tag == "form":
            self.inside = False
        elif tag == "textarea" and self.textarea is not None:
            self.data.append((self.textarea, self.text))
            self.textarea = None


def form_data(page: str) -> dict[str, object]:
    """The fields of the page's submission form as the browser would send them (options read by regex)."""
    reader = _FormReader()
    reader.feed(page)
    values: MultiDict = MultiDict(reader.data)
    # Selects: the selected option, else the first one (as a browser does).
    for name, body in re.findall(r'<select[^>]*name="([^"]+)"[^>]*>(.*?)</select>', page, re.S):
        options = re.findall(r"<option([^>]*)>(.*?)</option>", body, re.S)
        chosen = next((o for o in options if "selected" in o[0]), options[0] if options else None)
        if chosen is not None:
            value = re.search(r'value="([^"]*)"', chosen[0])
            values.setlist(name, [html.unescape(value.group(1) if value else chosen[1].strip())])
    return {k: (v if len(v) > 1 else v[0]) for k, v in values.lists()}


def spec_of(client, headers, job_id: int) -> dict:
    """The stored spec of a job, read through the API."""
    return client.get(f"/api/v1/jobs/{job_id}", headers=headers).get_json()["spec"]


def job_count(client, headers) -> int:
    """How many jobs the user has, through the API."""
    return len(client.get("/api/v1/jobs?limit=100", headers=headers).get_json()["items"])


def field_error(page: str, path: str) -> str:
    """The error shown next to the field at ``path`` ("" if none)."""
    field_id = "f-" + re.sub(r"[^a-z0-9]+", "-", path)
    match = re.search(rf'<p class="field-error" id="{field_id}-error">(.*?)</p>', page, re.S)
    return html.unescape(match.group(1)) if match else ""


def field_value(page: str, path: str) -> str:
    """The value an input at ``path`` shows."""
    match = re.search(rf'name="{re.escape(path)}" value="([^"]*)"', page)
    return html.unescape(match.group(1)) if match else ""


class Writer(dict):
    """A signed-in user's bearer headers (for API checks), and their email."""

    email: str


@pytest.fixture
def writer(client, person):
    """A signed-in user; returns their bearer headers for API checks."""
    email, headers = person()
    assert sign_in(client, email, PASSWORD).status_code == 302
    found = Writer(headers)
    found.email = email
    return found


def post_training(client, overrides: dict, query: str = ""):
    """Open the training form, fill ``overrides`` over what it shows, and submit it."""
    page = client.get("/jobs/new" + query).get_data(as_text=True)
    data = form_data(page)
    data.update(overrides)
    data = {k: v for k, v in data.items() if v is not None}
    return client.post("/jobs/new", data=data)


def test_a_valid_training_form_creates_exactly_one_job_with_the_typed_spec(client, writer):
    before = job_count(client, writer)
    response = post_training(client, {
        "name": "form-mlp", "dataset.id": "builtin:iris", "hyperparameters.epochs": "2",
        "hyperparameters.learning_rate": "0.01", "model.hidden_sizes": "16, 8", "model.dropout": "0.2",
        "model.activation": "gelu", "priority": "high", "hyperparameters.grad_clip": "1.5",
        "metadata": '{"team": "forms"}',
    })
    assert response.status_code == 302
    job_id = int(re.fullmatch(r"/jobs/(\d+)", response.headers["Location"]).group(1))
    assert job_count(client, writer) == before + 1
    expected = parse_spec({
        "kind": "train", "name": "form-mlp", "dataset": {"id": "builtin:iris"}, "priority": "high",
        "model": {"arch": "mlp", "hidden_sizes": [16, 8], "dropout": 0.2, "activation": "gelu"},
        "hyperparameters": {"epochs": 2, "learning_rate": 0.01, "grad_clip": 1.5}, "metadata": {"team": "forms"},
    }).model_dump(mode="json")
    assert spec_of(client, writer, job_id) == expected
    page = client.get(response.headers["Location"]).get_data(as_text=True)
    assert f"Job #{job_id} submitted." in page


ARCH_FIELDS = [
    ("mlp", {"model.hidden_sizes": "32", "model.dropout": "0.1", "model.activation": "tanh"},
     {"hidden_sizes": [32], "dropout": 0.1, "activation": "tanh"}),
    ("lstm", {"model.hidden_size": "24", "model.num_layers": "2", "model.bidirectional": "on", "model.dropout": "0.3"},
     {"hidden_size": 24, "num_layers": 2, "bidirectional": True, "dropout": 0.3}),
    ("gru", {"model.hidden_size": "12", "model.num_layers": "1", "model.dropout": "0"},
     {"hidden_size": 12, "num_layers": 1, "bidirectional": False, "dropout": 0.0}),
    ("transformer", {"model.d_model": "32", "model.nhead": "8", "model.num_layers": "3", "model.dim_feedforward": "64",
                     "model.dropout": "0.05", "model.positional": "learned", "model.pooling": "cls"},
     {"d_model": 32, "nhead": 8, "num_layers": 3, "dim_feedforward": 64, "dropout": 0.05, "positional": "learned",
      "pooling": "cls"}),
    ("cnn1d", {"model.channels": "8, 16, 32", "model.kernel_size": "5", "model.dropout": "0.25"},
     {"channels": [8, 16, 32], "kernel_size": 5, "dropout": 0.25}),
    # cnn2d serves images only, so its form names the image built-in.
    ("cnn2d", {"model.channels": "8, 16", "model.kernel_size": "5", "model.dropout": "0.1",
               "dataset.id": "builtin:digits_images"},
     {"channels": [8, 16], "kernel_size": 5, "dropout": 0.1}),
]


@pytest.mark.parametrize("arch,typed,expected", ARCH_FIELDS, ids=[a for a, _, _ in ARCH_FIELDS])
def test_each_architectures_own_fields_reach_the_spec(client, writer, arch, typed, expected):
    page = client.get(f"/jobs/new?model.arch={arch}").get_data(as_text=True)
    for path in typed:
        if path.startswith("model."):
            assert f'name="{path}"' in page, f"{path} is not on the {arch} form"
    response = post_training(client, {"name": f"form-{arch}", "dataset.id": "builtin:digits", "model.arch": arch,
                                      "model.bidirectional": None, **typed}, query=f"?model.arch={arch}")
    assert response.status_code == 302, field_errors_of(response)
    job_id = int(response.headers["Location"].rsplit("/", 1)[1])
    # Text settings (embedding_dropout, embedding_init, tfidf) keep their defaults: this form trains on digits.
    text_defaults = {"embedding_dropout": 0.1, "embedding_init": "lsa"} if arch != "cnn2d" else {}
    text_defaults.update({"tfidf": None} if arch == "mlp" else {})
    assert spec_of(client, writer, job_id)["model"] == {"arch": arch, **text_defaults, **expected}


def field_errors_of(response) -> list[str]:
    """Every inline error on a page (for assertion messages)."""
    return re.findall(r'class="field-error"[^>]*>(.*?)</p>', response.get_data(as_text=True))


def test_without_javascript_show_fields_swaps_the_architecture_and_keeps_the_rest(client, writer):
    page = client.get("/jobs/new").get_data(as_text=True)
    data = {**form_data(page), "name": "kept-name", "model.arch": "lstm", "refresh": "model"}
    response = client.post("/jobs/new", data=data)
    assert response.status_code == 200
    shown = response.get_data(as_text=True)
    assert 'name="model.hidden_size"' in shown and 'name="model.hidden_sizes"' not in shown
    assert field_value(shown, "name") == "kept-name"
    # The htmx partial is the same fieldset, rendered by the same template.
    partial = client.get("/jobs/new/model-fields?model.arch=transformer").get_data(as_text=True)
    assert 'id="model-fields"' in partial and 'name="model.nhead"' in partial


BAD_VALUES = [
    ("epochs 0", "", {"hyperparameters.epochs": "0"}, "hyperparameters.epochs"),
    ("d_model not divisible by nhead", "?model.arch=transformer",
     {"model.arch": "transformer", "model.d_model": "66", "model.nhead": "4"}, "model.d_model"),
    ("unknown dataset column", "", {"dataset.target": "petal_colour"}, "dataset.target"),
    ("not an integer", "", {"hyperparameters.batch_size": "lots"}, "hyperparameters.batch_size"),
]


@pytest.mark.parametrize("case,query,bad,path", BAD_VALUES, ids=[c for c, *_ in BAD_VALUES])
def test_a_bad_value_shows_the_apis_message_next_to_its_field_and_keeps_the_rest(client, writer, case, query, bad, path):
    before = job_count(client, writer)
    typed = {"name": "typed-name", "dataset.id": "builtin:iris", "hyperparameters.learning_rate": "0.005", **bad}
    response = post_training(client, typed, query=query)
    assert response.status_code == 422
    page = response.get_data(as_text=True)
    # The API's answer to the same spec.
    spec = {"kind": "train", "name": "typed-name", "dataset": {"id": "builtin:iris"},
            "hyperparameters": {"learning_rate": 0.005}, "model": {"arch": typed.get("model.arch", "mlp")}}
    for key, value in bad.items():
        group, _, leaf = key.rpartition(".")
        if leaf != "arch":
            spec.setdefault(group, {})[leaf] = int(value) if value.isdigit() else value
    api = client.post("/api/v1/jobs", json=spec, headers=writer)
    assert api.status_code == 422
    message = api.get_json()["errors"][0]["message"]
    assert field_error(page, path) == message
    assert 'role="alert"' in page and "nothing was submitted" in page
    assert field_value(page, "name") == "typed-name"
    assert field_value(page, "hyperparameters.learning_rate") == "0.005"
    for key, value in bad.items():
        if key != "model.arch":
            assert field_value(page, key) == value or f"<option selected>{value}</option>" in page
    assert job_count(client, writer) == before


CLONES = [
    {"kind": "train", "name": "clone-transformer", "model": {"arch": "transformer", "d_model": 48, "nhead": 6},
     "dataset": {"id": "builtin:digits", "normalize": False, "split": {"val_fraction": 0.2, "seed": 7}},
     "hyperparameters": {"epochs": 3, "optimizer": "sgd", "momentum": 0.8, "grad_clip": 0.5,
                         "early_stopping": {"metric": "val_accuracy", "mode": "max", "patience": 2}},
     "resources": {"device": "cpu", "precision": "fp32"}, "checkpoint": {"every_epochs": 2, "keep_last": 1},
     "priority": "low", "max_attempt_runtime_s": 600, "max_attempts": 2, "metadata": {"team": "x", "n": 3}},
    {"kind": "train", "name": "clone-lstm", "model": {"arch": "lstm", "bidirectional": True, "num_layers": 2},
     "dataset": {"id": "builtin:sunspots", "window": 12, "horizon": 2, "target": "SUNACTIVITY"},
     "hyperparameters": {"scheduler": "step", "step_size": 3, "gamma": 0.5, "warmup_epochs": 1}},
    {"kind": "train", "name": "clone-cnn", "model": {"arch": "cnn1d", "channels": [4, 4]},
     "dataset": {"id": "builtin:wine", "features": ["alcohol", "malic_acid"], "task": "classification"}},
]


@pytest.mark.parametrize("spec", CLONES, ids=[s["name"] for s in CLONES])
def test_clone_prefills_every_field_and_resubmits_an_equal_spec(client, writer, spec):
    original = client.post("/api/v1/jobs", json=spec, headers=writer).get_json()
    page = client.get(f"/jobs/{original['id']}").get_data(as_text=True)
    assert f'href="/jobs/new?clone={original["id"]}"' in page
    response = post_training(client, {}, query=f"?clone={original['id']}")
    assert response.status_code == 302, field_errors_of(response)
    clone_id = int(response.headers["Location"].rsplit("/", 1)[1])
    assert clone_id != original["id"]
    assert spec_of(client, writer, clone_id) == original["spec"]


@pytest.fixture
def model_ref(writer, settings):
    """A registered classifier of four numbers owned by the signed-in user; returns ``name@1``."""
    name = f"iris-{uuid.uuid4().hex[:6]}"
    with session_scope(settings.database_url) as s:
        token_owner = s.query(User).filter_by(email=writer.email).one()
        job = Job(owner_id=token_owner.id, kind="train", name=name, state="succeeded", queue="train", spec={})
        s.add(job)
        s.flush()
        ckpt = Checkpoint(job_id=job.id, attempt=1, epoch=1, step=1, path=f"jobs/{job.id}/c", size_bytes=1, sha256="0" * 64)
        s.add(ckpt)
        s.flush()
        s.add(ModelVersion(owner_id=token_owner.id, name=name, version=1, job_id=job.id, checkpoint_id=ckpt.id,
                           arch="mlp", task="classification", metrics={},
                           signature={"input_shape": [4], "classes": CLASSES}))
    return f"{name}@1"


def post_prediction(client, overrides: dict, files: dict | None = None):
    """Open the prediction form, fill ``overrides``, and submit it (multipart)."""
    data = {**form_data(client.get("/jobs/predict").get_data(as_text=True)), **overrides}
    data.update(files or {})
    return client.post("/jobs/predict", data=data, content_type="multipart/form-data")


@pytest.mark.parametrize("rows,expected", [
    ("sepal_length,sepal_width,petal_length,petal_width\n5.1,3.5,1.4,0.2\n6,3,5,2\n", [[5.1, 3.5, 1.4, 0.2], [6, 3, 5, 2]]),
    ("[[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]", [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]),
], ids=["csv", "json"])
def test_the_prediction_form_submits_pasted_rows_as_a_predict_job(client, writer, model_ref, rows, expected):
    page = client.get("/jobs/predict").get_data(as_text=True)
    assert f'<option value="{model_ref}"' in page
    before = job_count(client, writer)
    response = post_prediction(client, {"model": model_ref, "inputs": rows})
    assert response.status_code == 302, field_errors_of(response)
    job_id = int(response.headers["Location"].rsplit("/", 1)[1])
    spec = spec_of(client, writer, job_id)
    assert spec["kind"] == "predict" and spec["model"] == model_ref and spec["inputs"] == expected
    assert job_count(client, writer) == before + 1
    # Clone opens the prediction form with the same model and rows.
    cloned = client.get(f"/jobs/predict?clone={job_id}").get_data(as_text=True)
    assert form_data(cloned)["model"] == model_ref


def test_the_prediction_form_reads_an_uploaded_csv_file(client, writer, model_ref):
    file = (io.BytesIO(b"a,b,c,d\n1,2,3,4\n"), "rows.csv")
    response = post_prediction(client, {"model": model_ref, "inputs": ""}, files={"inputs_file": file})
    assert response.status_code == 302, field_errors_of(response)
    assert spec_of(client, writer, int(response.headers["Location"].rsplit("/", 1)[1]))["inputs"] == [[1, 2, 3, 4]]


def test_a_row_of_the_wrong_width_shows_the_apis_error_inline(client, writer, model_ref):
    before = job_count(client, writer)
    response = post_prediction(client, {"model": model_ref, "inputs": "1,2,3,4\n1,2,3\n"})
    assert response.status_code == 422
    page = response.get_data(as_text=True)
    api = client.post("/api/v1/jobs", json={"kind": "predict", "model": model_ref, "inputs": [[1, 2, 3, 4], [1, 2, 3]]},
                      headers=writer).get_json()["errors"][0]
    assert api["field"] == "inputs[1]"
    assert field_error(page, "inputs") == f"inputs[1]: {api['message']}"
    assert "1,2,3,4\n1,2,3" in html.unescape(page)  # the pasted rows are kept
    assert job_count(client, writer) == before
    unreadable = post_prediction(client, {"model": model_ref, "inputs": "1,2,x,4"})
    assert unreadable.status_code == 422
    assert field_error(unreadable.get_data(as_text=True), "inputs") == "line 1, column 3: 'x' is not a number"


def test_a_viewer_gets_no_forms_and_no_links(client, person, settings):
    email, _ = person(role="viewer")
    sign_in(client, email, PASSWORD)
    jobs_page = client.get("/jobs").get_data(as_text=True)
    assert "New training job" not in jobs_page and "New prediction" not in jobs_page
    token = csrf_token(jobs_page)
    for url in ("/jobs/new", "/jobs/predict", "/jobs/new/model-fields?model.arch=gru"):
        assert client.get(url).status_code == 403
    for url in ("/jobs/new", "/jobs/predict"):
        assert client.post(url, data={"csrf_token": token, "name": "x", "dataset.id": "builtin:iris"}).status_code == 403
    with session_scope(settings.database_url) as s:
        viewer = s.query(User).filter_by(email=email).one()
        job = Job(owner_id=viewer.id, kind="train", name="viewed", state="queued", queue="train",
                  spec={"kind": "train"})
        s.add(job)
        s.flush()
        job_id = job.id
    page = client.get(f"/jobs/{job_id}").get_data(as_text=True)
    assert "viewed" in page and "Clone" not in page


def test_a_form_post_without_its_csrf_token_is_refused(client, writer):
    before = job_count(client, writer)
    data = form_data(client.get("/jobs/new").get_data(as_text=True))
    data.pop("csrf_token")
    data.update({"name": "forged", "dataset.id": "builtin:iris"})
    assert client.post("/jobs/new", data=data).status_code == 400
    assert client.post("/jobs/predict", data={"model": "x@1", "inputs": "1,2"}).status_code == 400
    assert job_count(client, writer) == before
