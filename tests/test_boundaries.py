"""Import boundaries: the web never loads torch; the worker never loads the web views."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys\nprint('\\n'.join(sys.modules))"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout
    return set(out.split())


def test_web_app_imports_no_torch():
    loaded = _modules_after("from app import create_app\napp = create_app()\napp.test_client().get('/healthz')")
    assert "flask" in loaded
    assert not {m for m in loaded if m == "torch" or m.startswith("torch.")}
    assert "worker" not in loaded and "celery.worker" not in loaded


def test_worker_tasks_import_no_web_views():
    loaded = _modules_after("import worker.tasks")
    assert "worker.runner" in loaded
    assert not {m for m in loaded if m == "app.web" or m.startswith("app.web.")}
    assert "flask" not in loaded
