"""The web (stored schema) and the worker (loaded frame) infer the same task for the same upload."""

from __future__ import annotations

import io

import pandas as pd
import pytest

from app import datasets, storage, task_rules
from app.accounts import create_user
from app.jobs import service
from app.jobs.errors import SpecError
from app.jobs.schemas import DatasetRef
from worker.ml.datasets import load_table
from worker.ml.preparation import prepare

N = 60


def _bytes(frame: pd.DataFrame, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "csv":
        frame.to_csv(buf, index=False)
    elif fmt == "jsonl":
        frame.to_json(buf, orient="records", lines=True)
    else:
        frame.to_parquet(buf, index=False)
    return buf.getvalue()


def _frame(target) -> pd.DataFrame:
    return pd.DataFrame({"x": [float(i % 7) for i in range(N)], "y": target})


CASES = [
    # (case, frame, format, dataset reference beyond the id, task both sides must infer)
    ("int, 3 classes", _frame([i % 3 for i in range(N)]), "csv", {"target": "y"}, "classification"),
    ("int, 20 classes", _frame([i % 20 for i in range(N)]), "jsonl", {"target": "y"}, "classification"),
    ("int, 21 classes", _frame([i % 21 for i in range(N)]), "csv", {"target": "y"}, "regression"),
    ("uint8, 4 classes", _frame(pd.array([i % 4 for i in range(N)], dtype="uint8")), "parquet", {"target": "y"},
     "classification"),
    ("nullable Int64", _frame(pd.array([i % 5 for i in range(N)], dtype="Int64")), "parquet", {"target": "y"},
     "classification"),
    ("float", _frame([i / 3 for i in range(N)]), "csv", {"target": "y"}, "regression"),
    ("whole floats", _frame([float(i % 2) for i in range(N)]), "parquet", {"target": "y"}, "regression"),
    ("strings", _frame(["cat" if i % 2 else "dog" for i in range(N)]), "csv", {"target": "y"}, "classification"),
    ("bools", _frame([i % 3 == 0 for i in range(N)]), "jsonl", {"target": "y"}, "classification"),
    ("text column", pd.DataFrame({"text": [f"word{i % 5} other{i}" for i in range(N)], "y": [i % 2 for i in range(N)]}),
     "csv", {"target": "y", "text_column": "text"}, "text_classification"),
    ("window given", pd.DataFrame({"value": [float(i % 11) for i in range(N)]}), "csv",
     {"target": "value", "window": 5}, "forecasting"),
]


@pytest.mark.parametrize("case,frame,fmt,ref,expected", CASES, ids=[c[0] for c in CASES])
def test_web_and_worker_infer_the_same_task(session, settings, case, frame, fmt, ref, expected):
    user, _ = create_user(session=session, email=f"rules-{case.replace(' ', '-').replace(',', '')}@example.com")
    ds = datasets.upload(session=session, owner=user, filename=f"d.{fmt}", data=_bytes(frame, fmt), settings=settings)
    dataset = DatasetRef(id=f"dataset:{ds.id}", **ref)

    web_task = service.check_dataset(session=session, user=user, dataset=dataset)
    table = load_table(dataset, storage.resolve(settings.storage_root, ds.path), ds.format)
    worker_task = prepare(dataset, table).task

    assert web_task == worker_task == expected


def test_web_and_worker_default_to_the_same_window(session, settings):
    user, _ = create_user(session=session, email="rules-window@example.com")
    series = pd.DataFrame({"value": [float(i % 13) for i in range(80)]})
    ds = datasets.upload(session=session, owner=user, filename="s.csv", data=_bytes(series, "csv"), settings=settings)
    dataset = DatasetRef(id=f"dataset:{ds.id}", target="value", task="forecasting")

    assert service.check_dataset(session=session, user=user, dataset=dataset) == "forecasting"
    table = load_table(dataset, storage.resolve(settings.storage_root, ds.path), ds.format)
    assert prepare(dataset, table).signature["window"] == task_rules.DEFAULT_WINDOW

    short = pd.DataFrame({"value": [float(i) for i in range(task_rules.DEFAULT_WINDOW + 1)]})
    ds = datasets.upload(session=session, owner=user, filename="t.csv", data=_bytes(short, "csv"), settings=settings)
    with pytest.raises(SpecError, match=f"window {task_rules.DEFAULT_WINDOW}"):
        service.check_dataset(session=session, user=user, dataset=DatasetRef(id=f"dataset:{ds.id}", target="value",
                                                                          task="forecasting"))
