"""Fine-tuning MiniLM as a plain Hugging Face ``transformers`` loop: the baseline that
``bench.overhead --preset minilm`` (CPU) and ``bench.gpu_smoke --model minilm`` (CUDA, bf16) set
next to the same fine-tuning as a Kiln job.

The loop is what a careful person writes from the transformers docs: ``AutoTokenizer`` once over
the texts (as ``datasets.map`` would), padding per batch with ``tokenizer.pad`` (what
``DataCollatorWithPadding`` does), ``AutoModel`` with a mean-pooled linear head, ``torch.optim.AdamW``,
validation every epoch and a test evaluation at the end. It trains on the same rows, labels, split,
seed and batch order as the job (Kiln's seeded permutation), so on the CPU both end with the same
train loss to the bit.
"""

from __future__ import annotations

import os
import time
from functools import cache
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights come from an installed package, never a hub

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

CATEGORIES = ("computers", "food", "love", "law")
CSV_NAME = "fortunes-4.csv"
# A full fine-tune (no frozen part, no LoRA) with a classification head on 400 real fortunes in four
# categories; the dataset id is filled in once the CSV is uploaded.
SPEC = {"kind": "train", "name": "overhead-minilm",
        "dataset": {"id": "dataset:0", "text_column": "text", "target": "label"},
        "model": {"arch": "pretrained", "base": "minilm-l6", "max_length": 64, "dropout": 0.1},
        "hyperparameters": {"epochs": 2, "batch_size": 16, "learning_rate": 5e-5, "seed": 0},
        "checkpoint": {"every_epochs": 1, "keep_last": 3}}


def corpus_csv(folder: Path, per_category: int = 100) -> Path:
    """The first ``per_category`` fortunes of each category (Debian's fortunes package) as a CSV."""
    from tests.worker.ml.corpora import fortunes

    path = Path(folder) / CSV_NAME
    if not path.exists():
        fortunes(CATEGORIES, per_category=per_category).to_csv(path, index=False)
    return path


@cache
def _tokenizer(folder: str):
    # Loaded once per process, as the worker does (its tokenizer cache is per process too).
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def _mean_pooled(encoder, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    hidden = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


def plain_loop(spec_dict: dict, csv_path: Path, *, device: str = "cpu", bf16: bool = False) -> dict[str, float]:
    """Fine-tune as a plain transformers script; final epoch's train loss, samples trained, training seconds."""
    from transformers import AutoModel

    from app import pretrained as catalog
    from app.jobs.schemas import parse_spec
    from worker.ml.datasets import split_indices
    from worker.ml.progress import epoch_permutation

    spec = parse_spec(spec_dict)
    hp, config = spec.hyperparameters, spec.model
    folder = str(catalog.get(config.base).directory())
    frame = pd.read_csv(csv_path)
    classes = sorted(set(frame["label"]))
    labels = torch.tensor([classes.index(label) for label in frame["label"]])
    tokenizer = _tokenizer(folder)
    input_ids = tokenizer(frame["text"].fillna("").astype(str).tolist(), truncation=True,
                          max_length=config.max_length)["input_ids"]
    train, val, test = split_indices(len(frame), spec.dataset.split)

    torch.manual_seed(hp.seed)
    encoder = AutoModel.from_pretrained(folder, local_files_only=True, use_safetensors=True).to(device)
    dropout = nn.Dropout(config.dropout)
    head = nn.Linear(encoder.config.hidden_size, len(classes)).to(device)
    network = nn.ModuleList([encoder, dropout, head])  # train() and eval() reach the head's dropout too
    optimizer = torch.optim.AdamW(network.parameters(), lr=hp.learning_rate, weight_decay=hp.weight_decay)

    def batch_of(rows) -> dict[str, torch.Tensor]:
        padded = tokenizer.pad({"input_ids": [input_ids[i] for i in rows]}, return_tensors="pt")
        return {k: v.to(device) for k, v in padded.items()}

    def forward(rows) -> torch.Tensor:
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            return head(dropout(_mean_pooled(encoder, batch_of(rows))))

    @torch.no_grad()
    def evaluate(rows: np.ndarray) -> tuple[float, float]:
        network.eval()
        total, right = 0.0, 0
        for start in range(0, len(rows), max(hp.batch_size, 256)):
            part = rows[start:start + max(hp.batch_size, 256)]
            logits, truth = forward(part).float(), labels[part].to(device)
            total += float(F.cross_entropy(logits, truth, reduction="sum"))
            right += int((logits.argmax(dim=1) == truth).sum())
        network.train()
        return total / max(len(rows), 1), right / max(len(rows), 1)

    epoch_loss, seen, training = 0.0, 0, 0.0
    for epoch in range(hp.epochs):
        network.train()
        if device != "cpu":
            torch.cuda.synchronize()
        started = time.perf_counter()
        order = train[epoch_permutation(len(train), hp.seed, epoch).numpy()]
        total, count = 0.0, 0
        for i in range(0, len(order), hp.batch_size):
            rows = order[i:i + hp.batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(forward(rows).float(), labels[rows].to(device), reduction="sum") / len(rows)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(rows)
            count += len(rows)
        if device != "cpu":
            torch.cuda.synchronize()
        training += time.perf_counter() - started
        seen += count
        epoch_loss = total / count
        evaluate(val)  # validation loss and accuracy every epoch
    evaluate(test)
    return {"loss": epoch_loss, "samples": seen, "train_seconds": training}
