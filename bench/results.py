"""Full-size quality runs behind docs/results.md: each preset trained to completion on one CPU.

    .venv/bin/python -m bench.results [--only digits-mlp ...]
    .venv/bin/python -m bench.results --only fortunes-mlp-tfidf fortunes-gru ...   # real text only

Each preset goes through ``worker.ml.training.train`` exactly as a job would (same splits,
normalisation, checkpoints) and prints its test metrics next to the bar it must clear.

The ``fortunes-*`` presets train Kiln's text models on every fortune (20 to 400 characters) of six
categories of Debian's ``fortunes`` package, as an uploaded CSV; their bar is the accuracy of
TF-IDF (1-2 grams) + logistic regression on the same split minus ``TEXT_MARGIN`` (``fortunes-minilm-lora``,
the pretrained encoder, must beat it outright), printed with the majority class.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

PRESETS = {
    "digits-mlp": ({"arch": "mlp", "hidden_sizes": [256, 128], "dropout": 0.1}, {"id": "builtin:digits"},
                   {"epochs": 40, "batch_size": 32, "learning_rate": 0.001, "scheduler": "cosine", "weight_decay": 0.01},
                   ("test_accuracy", ">=", 0.97)),
    "digits-lstm": ({"arch": "lstm", "hidden_size": 128, "num_layers": 2}, {"id": "builtin:digits"},
                    {"epochs": 30, "batch_size": 32, "learning_rate": 0.002, "scheduler": "cosine"},
                    ("test_accuracy", ">=", 0.95)),
    "digits-transformer": ({"arch": "transformer", "d_model": 64, "nhead": 4, "num_layers": 2, "dim_feedforward": 128},
                           {"id": "builtin:digits"},
                           {"epochs": 40, "batch_size": 32, "learning_rate": 0.001, "scheduler": "cosine",
                            "warmup_epochs": 2}, ("test_accuracy", ">=", 0.95)),
    "breast-cancer-mlp": ({"arch": "mlp", "hidden_sizes": [64, 32], "dropout": 0.1}, {"id": "builtin:breast_cancer"},
                          {"epochs": 60, "batch_size": 32, "learning_rate": 0.001, "weight_decay": 0.01},
                          ("test_accuracy", ">=", 0.95)),
    "sunspots-lstm": ({"arch": "lstm", "hidden_size": 64, "num_layers": 1},
                      {"id": "builtin:sunspots", "window": 24},
                      {"epochs": 150, "batch_size": 16, "learning_rate": 0.002, "scheduler": "cosine"},
                      ("test_rmse / test_naive_rmse", "<=", 0.85)),
    "text-lstm": ({"arch": "lstm", "hidden_size": 64}, {"id": "dataset:1", "text_column": "text", "target": "topic"},
                  {"epochs": 15, "batch_size": 32, "learning_rate": 0.003}, ("test_accuracy", ">=", 0.6)),
}

FORTUNES_DIR = Path("/usr/share/games/fortunes")
FORTUNE_CATEGORIES = ("computers", "food", "law", "love", "politics", "science")
TEXT_MARGIN = 0.03
TEXT_SPLIT = {"val_fraction": 0.15, "test_fraction": 0.15, "seed": 0}
_TEXT_DATA = {"id": "dataset:1", "text_column": "text", "target": "label", "max_tokens": 64, "split": TEXT_SPLIT}
_TEXT_HP = {"epochs": 30, "batch_size": 32, "learning_rate": 0.003,
            "early_stopping": {"metric": "val_accuracy", "patience": 5}}
_TEXT_BAR = ("test_accuracy", ">=", "tfidf-lr")
PRESETS.update({
    "fortunes-mlp-tfidf": ({"arch": "mlp", "hidden_sizes": [256], "dropout": 0.5, "tfidf": {}}, _TEXT_DATA,
                           {**_TEXT_HP, "weight_decay": 0.01}, _TEXT_BAR),
    "fortunes-mlp": ({"arch": "mlp", "hidden_sizes": [128], "embedding_dropout": 0.3}, _TEXT_DATA, _TEXT_HP, _TEXT_BAR),
    "fortunes-lstm": ({"arch": "lstm", "hidden_size": 64, "bidirectional": True, "embedding_dropout": 0.3},
                      _TEXT_DATA, {**_TEXT_HP, "weight_decay": 0.1}, _TEXT_BAR),
    "fortunes-gru-bpe": ({"arch": "gru", "hidden_size": 64, "bidirectional": True, "embedding_dropout": 0.3},
                         {**_TEXT_DATA, "tokenizer": {"kind": "bpe", "vocab_size": 8000}},
                         {**_TEXT_HP, "weight_decay": 0.1}, _TEXT_BAR),
    "fortunes-cnn1d": ({"arch": "cnn1d", "channels": [128], "kernel_size": 3, "embedding_dropout": 0.3},
                       _TEXT_DATA, _TEXT_HP, _TEXT_BAR),
    "fortunes-transformer": ({"arch": "transformer", "d_model": 64, "nhead": 2, "num_layers": 1,
                              "dim_feedforward": 128}, _TEXT_DATA, {**_TEXT_HP, "learning_rate": 0.001}, _TEXT_BAR),
    # The catalog's MiniLM fine-tuned with LoRA: it must beat the baseline, not come near it.
    "fortunes-minilm-lora": ({"arch": "pretrained", "base": "minilm-l6", "max_length": 64,
                              "lora": {"r": 8, "alpha": 16}},
                             {"id": "dataset:1", "text_column": "text", "target": "label", "split": TEXT_SPLIT},
                             {"epochs": 3, "batch_size": 16, "learning_rate": 0.001, "scheduler": "linear",
                              "warmup_steps": 20}, ("test_accuracy", ">", "tfidf-lr")),
})


def fortunes_dataset(path: Path) -> tuple[float, float]:
    """Every fortune of 20 to 400 characters of FORTUNE_CATEGORIES as (text, label) CSV at ``path``;
    returns (majority class, TF-IDF + logistic regression) test accuracy on the jobs' split."""
    import pandas as pd
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    from app.jobs.schemas import SplitConfig
    from worker.ml.datasets import split_indices

    rows = []
    for category in FORTUNE_CATEGORIES:
        raw = (FORTUNES_DIR / category).read_text(encoding="utf-8", errors="replace")
        texts = [" ".join(part.split()) for part in raw.split("\n%\n")]
        rows += [{"text": t, "label": category} for t in texts if 20 <= len(t) <= 400]
    frame = pd.DataFrame(rows)
    frame.to_csv(path, index=False)
    train, _, test = split_indices(len(frame), SplitConfig(**TEXT_SPLIT))
    texts, labels = frame["text"].to_numpy(), frame["label"].to_numpy()
    majority = pd.Series(labels[train]).mode()[0]
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    classifier = LogisticRegression(C=10.0, max_iter=5000).fit(vectorizer.fit_transform(texts[train]), labels[train])
    return (float((labels[test] == majority).mean()),
            float((classifier.predict(vectorizer.transform(texts[test])) == labels[test]).mean()))


TOPICS = {
    "sport": "match goal team coach score league player season referee stadium",
    "cooking": "oven recipe flour butter simmer garlic sauce bake pepper dough",
    "finance": "market stock bond interest rate budget profit shares loan investor",
    "travel": "flight hotel passport beach museum train luggage ticket island tour",
}
FILLER = "the a of and to in is was for on that with it as at by this from".split()


def text_dataset(path: Path, rows: int = 2000, seed: int = 0) -> None:
    """Generated sentences: one topic word, often a distractor from another topic, filler; 4 classes (chance 0.25)."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    names = sorted(TOPICS)
    texts, labels = [], []
    for _ in range(rows):
        label = names[int(rng.integers(len(names)))]
        words = [rng.choice(TOPICS[label].split())]
        if rng.random() < 0.4:
            other = names[int(rng.integers(len(names)))]
            words.append(rng.choice(TOPICS[other].split()))
        words += list(rng.choice(FILLER, size=int(rng.integers(4, 12))))
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(label if rng.random() > 0.1 else names[int(rng.integers(len(names)))])
    pd.DataFrame({"text": texts, "topic": labels}).to_csv(path, index=False)


class Quiet:
    """Hooks that keep the test metrics."""

    def __init__(self):
        self.test = {}

    def on_metrics(self, scope, epoch, step, values):
        if scope == "test":
            self.test = values

    def on_progress(self, *a):
        pass

    def on_checkpoint(self, *a, **k):
        pass

    def stop_reason(self):
        return None


def run(name: str, workdir: Path) -> bool:
    from app.jobs.schemas import parse_spec
    from worker.ml.training import train

    model, dataset, hp, (metric, op, bar) = PRESETS[name]
    dataset_file = None
    if name.startswith("fortunes-"):
        dataset_file = workdir / "fortunes.csv"
        majority, linear = fortunes_dataset(dataset_file)
        print(f"{'':20s} fortunes ({', '.join(FORTUNE_CATEGORIES)}): majority class {majority:.4f}, "
              f"TF-IDF + logistic regression {linear:.4f}", flush=True)
        bar = round(linear, 4) if op == ">" else round(linear - TEXT_MARGIN, 4)
    elif dataset["id"].startswith("dataset:"):
        dataset_file = workdir / "text.csv"
        text_dataset(dataset_file)
    spec = parse_spec({"kind": "train", "name": name, "model": model, "dataset": dataset,
                       "hyperparameters": {**hp, "seed": 0}})
    hooks = Quiet()
    started = time.perf_counter()
    result = train(spec, hooks=hooks, dataset_file=dataset_file, dataset_format="csv" if dataset_file else None,
                   device="cpu")
    seconds = time.perf_counter() - started
    t = hooks.test
    value = t["test_rmse"] / t["test_naive_rmse"] if "/" in metric else t[metric]
    ok = {">=": value >= bar, ">": value > bar, "<=": value <= bar}[op]
    shown = ", ".join(f"{k}={v:.4f}" for k, v in sorted(t.items()) if k != "test_loss")
    print(f"{name:20s} {metric} = {value:.4f} (bar {op} {bar}) {'PASS' if ok else 'FAIL'}  [{shown}]  "
          f"{seconds:.0f}s, best epoch {result.best_epoch}",  # the epoch whose weights were tested
          flush=True)
    return ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=sorted(PRESETS))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        results = [run(name, Path(tmp)) for name in (args.only or PRESETS)]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
