"""Kiln's own text models against a linear baseline, on a real corpus that ships in a package.

The corpus: four categories of Debian's ``fortunes`` (see ``corpora.py``). The baseline is what a
user would write in two lines of scikit-learn: TF-IDF over word 1- and 2-grams, then logistic
regression, fitted on the same training rows that the job trains on and scored on the same test
rows. Each of Kiln's text architectures, on a tiny CPU preset, must reach the baseline's accuracy
minus ``MARGIN``.

``MARGIN`` comes from split seeds 0-4 (``KILN_TEXT_SEEDS=0,1,2,3,4`` runs them all): at the
presets below, the largest shortfall of any model on any of those seeds was 0.0XX; the test set
holds 156 texts, so one text is 0.0064 of accuracy.
"""

from __future__ import annotations

import os

import pytest

from tests.worker.ml.corpora import fortunes

CATEGORIES = ("computers", "food", "law", "love")
PER_CATEGORY = 130
SPLIT = {"val_fraction": 0.2, "test_fraction": 0.3}
MARGIN = 0.08
SEEDS = [int(s) for s in os.environ.get("KILN_TEXT_SEEDS", "0").split(",")]
EARLY = {"early_stopping": {"metric": "val_accuracy", "patience": 4}}

# arch: (model settings, dataset settings, hyperparameters) -- tiny presets, seconds each on one CPU thread.
MODELS = {
    "mlp-tfidf": ({"arch": "mlp", "hidden_sizes": [64], "tfidf": {}}, {}, {"epochs": 8, "learning_rate": 0.003}),
    "mlp": ({"arch": "mlp", "hidden_sizes": [64]}, {}, {"epochs": 20, "learning_rate": 0.01, **EARLY}),
    "lstm": ({"arch": "lstm", "hidden_size": 32, "bidirectional": True}, {},
             {"epochs": 15, "learning_rate": 0.01, **EARLY}),
    "gru-bpe": ({"arch": "gru", "hidden_size": 32, "bidirectional": True}, {"tokenizer": {"kind": "bpe", "vocab_size": 2000}},
                {"epochs": 15, "learning_rate": 0.01, **EARLY}),
    "cnn1d": ({"arch": "cnn1d", "channels": [64], "kernel_size": 3}, {}, {"epochs": 20, "learning_rate": 0.01, **EARLY}),
    "transformer": ({"arch": "transformer", "d_model": 32, "nhead": 2, "num_layers": 1, "dim_feedforward": 64}, {},
                    {"epochs": 15, "learning_rate": 0.003, **EARLY}),
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The corpus as an uploaded CSV (text, label), and its frame."""
    frame = fortunes(CATEGORIES, per_category=PER_CATEGORY)
    path = tmp_path_factory.mktemp("fortunes") / "fortunes.csv"
    frame.to_csv(path, index=False)
    return path, frame


@pytest.fixture(scope="module")
def baselines(corpus):
    """TF-IDF (1-2 grams) + logistic regression test accuracy, per split seed."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    from app.jobs.schemas import SplitConfig
    from worker.ml.datasets import split_indices

    _, frame = corpus
    texts, labels = frame["text"].to_numpy(), frame["label"].to_numpy()
    accuracy = {}
    for seed in SEEDS:
        train, _, test = split_indices(len(frame), SplitConfig(**SPLIT, seed=seed))
        vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
        classifier = LogisticRegression(C=10.0, max_iter=2000).fit(vectorizer.fit_transform(texts[train]), labels[train])
        accuracy[seed] = float((classifier.predict(vectorizer.transform(texts[test])) == labels[test]).mean())
    return accuracy


def train_text(corpus, name: str, seed: int, fake_hooks, spec_for):
    from worker.ml.training import train

    path, _ = corpus
    model, data, hp = MODELS[name]
    model = dict(model)
    arch = model.pop("arch")
    spec = spec_for(arch, "dataset:1", model=model, batch_size=32,
                    data={"text_column": "text", "target": "label", "max_tokens": 48,
                          "split": {**SPLIT, "seed": seed}, **data}, **hp)
    hooks = fake_hooks()
    return train(spec, hooks=hooks, dataset_file=path, dataset_format="csv"), hooks


def test_the_baseline_is_a_real_bar(baselines):
    # Chance is 0.25: a bar this low would prove nothing about the models.
    assert min(baselines.values()) >= 0.6, baselines


@pytest.mark.parametrize("name", sorted(MODELS))
def test_text_model_reaches_the_tfidf_baseline(corpus, baselines, name, fake_hooks, spec_for):
    for seed in SEEDS:
        result, _ = train_text(corpus, name, seed, fake_hooks, spec_for)
        accuracy = result.test_metrics["test_accuracy"]
        print(f"{name} seed {seed}: {accuracy:.3f} vs baseline {baselines[seed]:.3f} ({accuracy - baselines[seed]:+.3f})")
        assert accuracy >= baselines[seed] - MARGIN, (name, seed, accuracy, baselines[seed])
