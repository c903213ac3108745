"""Log lines are JSON and carry the job id and attempt of the job being run."""

from __future__ import annotations

import json
import logging

import pytest

from app.logs import bind_job, configure


@pytest.fixture(autouse=True)
def restore_root_logger():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_lines_carry_the_bound_job(capsys):
    configure("INFO", "json")
    log = logging.getLogger("kiln.test")
    with bind_job(7, 2):
        log.info("event=checkpoint epoch=%s", 3)
    log.warning("outside")
    lines = [json.loads(line) for line in capsys.readouterr().err.strip().splitlines()]
    assert lines[0]["job_id"] == 7 and lines[0]["attempt"] == 2
    assert lines[0]["message"] == "event=checkpoint epoch=3" and lines[0]["level"] == "INFO"
    assert lines[1]["job_id"] is None and lines[1]["level"] == "WARNING"


def test_text_format_is_available(capsys):
    configure("INFO", "text")
    with bind_job(5, 1):
        logging.getLogger("kiln.test").info("hello")
    assert "job_id=5 attempt=1 hello" in capsys.readouterr().err
