"""Fine-tuning MiniLM (installed from its package, offline) on a real corpus: quality, LoRA, resume, embeddings.

The corpus is Debian's fortunes (tests/worker/ml/corpora.py): four categories, the category is the label.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load as load_tensors
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

from app import pretrained as catalog
from tests.worker.ml.corpora import fortunes
from worker.ml.datasets import split_indices
from worker.ml.prediction import clear_cache, predict
from worker.ml.training import train

CATEGORIES = ("computers", "food", "love", "law")
TEXT_DATA = {"text_column": "text", "target": "label"}


def base_weights_file():
    entry = catalog.get("minilm-l6")
    return entry, entry.directory() / entry.weights


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """400 fortunes, 100 per category, as an uploaded CSV."""
    frame = fortunes(CATEGORIES, per_category=100)
    path = tmp_path_factory.mktemp("fortunes") / "fortunes.csv"
    frame.to_csv(path, index=False)
    return frame, path


@pytest.fixture(scope="module")
def lora_run(corpus, spec_for):
    """One LoRA fine-tune of MiniLM with a classification head (2 epochs, 48 tokens)."""
    frame, path = corpus
    entry, weights = base_weights_file()
    before = sha256(weights)
    from tests.worker.ml.conftest import FakeHooks

    spec = spec_for("pretrained", "dataset:1", data=TEXT_DATA, epochs=2, batch_size=16, learning_rate=1e-3,
                    scheduler="linear", warmup_steps=4,
                    model={"base": "minilm-l6", "max_length": 48, "lora": {"r": 8, "alpha": 16}})
    hooks = FakeHooks()
    result = train(spec, hooks=hooks, dataset_file=path, dataset_format="csv")
    return spec, result, hooks, before


def test_fine_tuned_minilm_beats_majority_and_tfidf_logistic_regression(corpus, lora_run):
    frame, _ = corpus
    spec, result, _, _ = lora_run
    train_idx, _, test_idx = split_indices(len(frame), spec.dataset.split)
    vectorizer = TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2))
    features = vectorizer.fit_transform(frame["text"])
    baseline = LogisticRegression(max_iter=2000, C=10.0).fit(features[train_idx], frame["label"].iloc[train_idx])
    tfidf_accuracy = float(np.mean(baseline.predict(features[test_idx]) == frame["label"].iloc[test_idx].to_numpy()))
    majority = frame["label"].iloc[test_idx].value_counts().max() / len(test_idx)
    accuracy = result.test_metrics["test_accuracy"]
    assert accuracy > majority + 0.3
    assert accuracy > tfidf_accuracy, (accuracy, tfidf_accuracy)


def test_lora_trains_only_the_adapter_and_its_checkpoint_is_small(lora_run):
    spec, result, hooks, before = lora_run
    entry, weights = base_weights_file()
    assert sha256(weights) == before == entry.sha256
    assert result.signature["base"] == "minilm-l6" and result.signature["base_sha256"] == entry.sha256
    assert result.signature["parameters"] > entry.parameters
    assert result.signature["trainable_parameters"] < entry.parameters / 100
    saved = hooks.checkpoints[-1].data
    names = [n for n in load_tensors(saved) if n.startswith("model.")]
    assert names and all("lora_" in n or n.startswith("model.head.") for n in names)
    assert len(saved) < entry.size_bytes / 20


def test_a_fine_tuned_model_predicts_and_embeds(corpus, lora_run):
    frame, _ = corpus
    _, _, hooks, _ = lora_run
    clear_cache()
    data = hooks.checkpoints[-1].data
    out = predict(data, frame["text"].iloc[:4].tolist())
    assert [p["class"] for p in out["predictions"]][0] in CATEGORIES
    embedded = predict(data, ["a computer program", "a cup of soup"], output="embedding")
    norms = np.linalg.norm(np.array(embedded["embeddings"]), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)


def test_kill_and_resume_of_a_fine_tuning_job_ends_with_the_same_weights(corpus, spec_for, fake_hooks, tmp_path):
    frame, _ = corpus
    path = tmp_path / "small.csv"
    frame.groupby("label").head(24).to_csv(path, index=False)
    spec = spec_for("pretrained", "dataset:1", data=TEXT_DATA, epochs=2, batch_size=16, learning_rate=1e-3,
                    scheduler="cosine", warmup_steps=2,
                    model={"base": "minilm-l6", "max_length": 32, "dropout": 0.2,
                           "lora": {"r": 4, "alpha": 8, "dropout": 0.1}})
    kwargs = {"dataset_file": path, "dataset_format": "csv"}
    straight_hooks = fake_hooks()
    straight = train(spec, hooks=straight_hooks, **kwargs)
    stopped_hooks = fake_hooks(stop_at_step=7, stop_reason_value="shutdown")
    stopped = train(spec, hooks=stopped_hooks, **kwargs)
    assert stopped.stopped == "shutdown" and stopped.steps == 7
    resumed_hooks = fake_hooks()
    resumed = train(spec, hooks=resumed_hooks, resume=stopped_hooks.checkpoints[-1].data, **kwargs)
    assert resumed.steps == straight.steps
    final_a = load_tensors(straight_hooks.checkpoints[-1].data)
    final_b = load_tensors(resumed_hooks.checkpoints[-1].data)
    weights = [n for n in final_a if n.startswith("model.")]
    assert weights and set(final_a) == set(final_b)
    for name in weights:
        torch.testing.assert_close(final_a[name], final_b[name], atol=1e-6, rtol=0)
    assert resumed.test_metrics == pytest.approx(straight.test_metrics, abs=1e-6)


def test_catalog_embeddings_are_unit_norm_and_a_paraphrase_is_the_nearest_neighbour():
    texts = ["The cat sat on the mat.", "How do I reset my password?", "Stock markets fell sharply today.",
             "It is raining heavily in the city."]
    paraphrases = ["I forgot my password, how can I change it?", "A cat was sitting on a rug.",
                   "There is a lot of rain in town.", "Share prices dropped steeply today."]
    out = predict(None, texts, output="embedding", compare_with=paraphrases, base="minilm-l6")
    vectors = np.array(out["embeddings"])
    assert vectors.shape == (4, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    nearest = np.array(out["similarities"]).argmax(axis=1)
    assert nearest.tolist() == [1, 0, 3, 2]


WARM = ("sunny", "hot", "warm", "summer", "fire", "desert", "tropical", "heat")
COLD = ("snow", "ice", "winter", "frozen", "cold", "arctic", "frost", "glacier")


def test_a_regression_head_fine_tunes_on_a_made_text_task_and_beats_predicting_the_mean(spec_for, hooks, tmp_path):
    # A made text-regression task: six words, some warm and the rest cold; the "temperature" is
    # five degrees per warm word. Nothing but the words says how warm a text is.
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(160):
        warm = int(rng.integers(0, 7))
        words = [*rng.choice(WARM, warm), *rng.choice(COLD, 6 - warm)]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "temperature": 5.0 * warm})
    frame = pd.DataFrame(rows)
    path = tmp_path / "temperatures.csv"
    frame.to_csv(path, index=False)
    spec = spec_for("pretrained", "dataset:1", data={"text_column": "text", "target": "temperature"}, epochs=3,
                    batch_size=16, learning_rate=5e-4,
                    model={"base": "minilm-l6", "max_length": 16, "head": "regression"})
    result = train(spec, hooks=hooks, dataset_file=path, dataset_format="csv")

    train_idx, _, test_idx = split_indices(len(frame), spec.dataset.split)
    truth = frame["temperature"].to_numpy()
    mean_rmse = float(np.sqrt(np.mean((truth[test_idx] - truth[train_idx].mean()) ** 2)))
    assert result.signature["task"] == "regression" and result.signature["num_outputs"] == 1
    # Test metrics are in degrees (the targets were standardised for training and turned back).
    assert result.test_metrics["test_rmse"] < 0.6 * mean_rmse, (result.test_metrics, mean_rmse)
    assert result.test_metrics["test_r2"] > 0.5, result.test_metrics
    clear_cache()
    out = predict(hooks.checkpoints[-1].data, [" ".join(COLD[:6]), " ".join(WARM[:6])])
    cold, warm = (p["value"] for p in out["predictions"])
    assert cold < 10.0 < 20.0 < warm, (cold, warm)
