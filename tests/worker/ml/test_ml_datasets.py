"""Built-in datasets agree with the catalog; uploads load, split and fail with errors a user can act on."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from app.catalog import BUILTIN_DATASETS, FORECASTING
from app.jobs.errors import UserError
from app.jobs.schemas import DatasetRef, SplitConfig
from app.jobs.schemas import CausalLMConfig
from worker.ml.datasets import load_builtin_raw, load_table, split_indices
from worker.ml.preparation import prepare
from worker.ml.text import Tokenizer
from worker.ml.training import train


@pytest.mark.parametrize("name", sorted(BUILTIN_DATASETS))
def test_every_catalog_entry_loads_with_the_stated_shape(name):
    entry = BUILTIN_DATASETS[name]
    ref = DatasetRef(id=f"builtin:{name}")
    table = load_table(ref, None, None)
    assert len(table.frame) == entry.num_rows
    if entry.task == "language_modeling":  # a text corpus: one text column, cut into token windows
        assert list(table.frame.columns) == list(entry.columns) and entry.target is None
        data = prepare(ref, table, CausalLMConfig(arch="causal_lm", block_size=32))
        assert data.task == entry.task and data.signature["tokens"]["train"] > 10_000
        return
    assert entry.target in table.frame.columns
    data = prepare(ref, table)
    assert data.task == entry.task
    sig = data.signature
    if entry.task == FORECASTING:
        # Every window of the series is used (horizon 1 straddles no split boundary).
        assert sum(sig["rows"].values()) == entry.num_rows - entry.default_window
        assert list(table.frame.columns) == list(entry.columns)
        assert sig["input_shape"] == [entry.default_window, 1]
        assert entry.num_features == 1
        assert np.isfinite(table.frame[entry.target]).all()
    elif entry.image_shape:
        assert sum(sig["rows"].values()) == entry.num_rows
        assert tuple(sig["input_shape"]) == entry.image_shape == table.images.shape[1:]
        assert int(np.prod(entry.image_shape)) == entry.num_features
    else:
        assert sum(sig["rows"].values()) == entry.num_rows
        assert len(sig["feature_names"]) == entry.num_features
        assert sig["input_shape"] == [entry.num_features]
        if entry.sequence_shape:
            assert tuple(sig["sequence_shape"]) == entry.sequence_shape
    assert (len(sig["classes"]) if sig["classes"] else None) == entry.num_classes
    x, y = load_builtin_raw(name)
    assert x.shape[0] == entry.num_rows and len(y) == entry.num_rows


def test_unknown_builtin_is_a_user_error():
    with pytest.raises(UserError, match="builtin:digits"):
        load_table(DatasetRef(id="builtin:nope"), None, None)


def test_digits_raw_rows_are_unnormalised_pixels():
    x, y = load_builtin_raw("digits")
    assert x.shape == (1797, 64) and x.min() == 0 and x.max() == 16
    assert set(np.unique(y)) == set(range(10))


def test_split_is_disjoint_complete_and_seeded_by_split_seed_only():
    train_idx, val_idx, test_idx = split_indices(1797, SplitConfig())
    assert len(train_idx) + len(val_idx) + len(test_idx) == 1797
    assert len(np.intersect1d(train_idx, test_idx)) == 0 and len(np.intersect1d(val_idx, test_idx)) == 0
    assert len(test_idx) == 270 and len(val_idx) == 270
    again = split_indices(1797, SplitConfig())
    assert all(np.array_equal(a, b) for a, b in zip((train_idx, val_idx, test_idx), again))
    other = split_indices(1797, SplitConfig(seed=1))
    assert not np.array_equal(test_idx, other[2])
    # Pinned values: the split must never move between releases, or held-out rows leak.
    assert test_idx[:5].tolist() == [2, 3, 11, 13, 20]


def test_hyperparameter_seed_does_not_move_the_test_split(spec_for, hooks):
    a = train(spec_for(epochs=1, seed=1), hooks=hooks)
    b = train(spec_for(epochs=1, seed=2), hooks=hooks)
    assert a.signature["rows"] == b.signature["rows"]


def _tabular_frame(n: int = 60) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=n), rng.normal(size=n)
    return pd.DataFrame({"a": a, "b": b, "note": ["x"] * n, "label": np.where(a + b > 0, "yes", "no")})


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_uploaded_files_load_in_every_format(tmp_path, fmt, spec_for, hooks):
    frame = _tabular_frame()
    path = tmp_path / f"data.{fmt}"
    if fmt == "csv":
        frame.to_csv(path, index=False)
    elif fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in frame.to_dict(orient="records")))
    else:
        frame.to_parquet(path)
    result = train(spec_for(dataset="dataset:7", data={"target": "label"}), hooks=hooks,
                   dataset_file=path, dataset_format=fmt)
    sig = result.signature
    # The default features are the numeric columns other than the target; the text column is skipped.
    assert sig["task"] == "classification" and sig["feature_names"] == ["a", "b"]
    assert sig["classes"] == ["no", "yes"]


def test_upload_task_is_inferred_from_the_target(tmp_path):
    frame = _tabular_frame().drop(columns=["note"])
    frame["amount"] = frame["a"] * 3.5
    path = tmp_path / "d.csv"
    frame.to_csv(path, index=False)
    regression = prepare(DatasetRef(id="dataset:1", target="amount"), load_table(DatasetRef(id="dataset:1"), path, "csv"))
    assert regression.task == "regression"
    classification = prepare(DatasetRef(id="dataset:1", target="label", features=["a"]),
                             load_table(DatasetRef(id="dataset:1"), path, "csv"))
    assert classification.task == "classification" and classification.signature["feature_names"] == ["a"]


def _write(tmp_path, text: str, name: str = "bad.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def _train_upload(spec_for, hooks, path, fmt="csv", **data):
    return train(spec_for(dataset="dataset:3", data=data), hooks=hooks, dataset_file=path, dataset_format=fmt)


def test_unknown_column_names_the_column(tmp_path, spec_for, hooks):
    path = _write(tmp_path, "a,b,label\n1,2,x\n3,4,y\n5,6,x\n")
    with pytest.raises(UserError, match="'colour'"):
        _train_upload(spec_for, hooks, path, target="label", features=["a", "colour"])
    with pytest.raises(UserError, match="unknown target column 'kind'"):
        _train_upload(spec_for, hooks, path, target="kind")


def test_non_numeric_feature_names_column_and_row(tmp_path, spec_for, hooks):
    path = _write(tmp_path, "a,b,label\n1,2,x\n3,4,y\n5,oops,x\n7,8,y\n")
    with pytest.raises(UserError, match=r"column 'b' has a non-numeric value 'oops' at row 3"):
        _train_upload(spec_for, hooks, path, target="label", features=["a", "b"])


def test_empty_file_is_a_user_error(tmp_path, spec_for, hooks):
    with pytest.raises(UserError, match="empty"):
        _train_upload(spec_for, hooks, _write(tmp_path, ""), target="label")
    with pytest.raises(UserError, match="no rows"):
        _train_upload(spec_for, hooks, _write(tmp_path, "a,label\n", "header.csv"), target="label")


def test_too_few_rows_for_the_window(tmp_path, spec_for, hooks):
    path = _write(tmp_path, "value\n" + "\n".join(str(i) for i in range(26)) + "\n")
    with pytest.raises(UserError, match="too few rows \\(26\\) for window 24"):
        _train_upload(spec_for, hooks, path, task="forecasting", target="value", window=24)


def test_single_class_target_is_a_user_error(tmp_path, spec_for, hooks):
    path = _write(tmp_path, "a,label\n1,x\n2,x\n3,x\n4,x\n")
    with pytest.raises(UserError, match="single class"):
        _train_upload(spec_for, hooks, path, target="label", task="classification")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this worker has CUDA")
def test_cuda_requested_without_cuda_is_a_user_error(spec_for, hooks):
    with pytest.raises(UserError, match="no CUDA device"):
        train(spec_for(device="cuda"), hooks=hooks)
    with pytest.raises(UserError, match="no CUDA device"):
        train(spec_for(), hooks=hooks, device="cuda")


def test_forecasting_split_is_in_time_order():
    ref = DatasetRef(id="builtin:sunspots")
    data = prepare(ref, load_table(ref, None, None))
    raw = load_table(ref, None, None).frame["SUNACTIVITY"].to_numpy()
    scale = data.features
    train_y = scale.invert(data.splits["train"][1].astype(np.float64))
    test_y = scale.invert(data.splits["test"][1].astype(np.float64))
    # Test targets are the last years of the series; train targets come before them.
    np.testing.assert_allclose(test_y[-1, 0], raw[-1], rtol=1e-5)
    np.testing.assert_allclose(train_y[0, 0], raw[24], rtol=1e-5)


def test_settings_of_another_task_are_refused(spec_for, hooks):
    with pytest.raises(UserError, match="window applies to forecasting"):
        train(spec_for(dataset="builtin:digits", data={"window": 8}), hooks=hooks)
    with pytest.raises(UserError, match="is a classification dataset"):
        train(spec_for(dataset="builtin:iris", data={"task": "regression"}), hooks=hooks)


def test_tokenizer_builds_a_capped_lowercase_vocabulary():
    tokenizer = Tokenizer.build(["The cat sat", "the CAT ran", "a dog"], vocab_size=4, max_tokens=5)
    assert tokenizer.vocabulary == ["<pad>", "<unk>", "cat", "the"]
    ids = tokenizer.encode(["the dog", "", "cat cat cat cat cat cat"])
    assert ids.tolist() == [[3, 1, 0, 0, 0], [1, 0, 0, 0, 0], [2, 2, 2, 2, 2]]
