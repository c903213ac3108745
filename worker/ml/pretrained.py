"""Pretrained encoders from the catalog: loaded offline, with a new head, frozen parts or LoRA adapters.

Weights come from an installed package (``app/pretrained.toml`` says which), never from a hub:
``HF_HUB_OFFLINE`` is set before transformers is imported, every load passes
``local_files_only=True`` and ``use_safetensors=True``, and the weights file's sha256 is checked
against the catalog first. A checkpoint of a fine-tuned model holds only the parameters that
trained (the head, the unfrozen layers, or just the LoRA adapters); the frozen rest is the base,
named in the signature with its sha256 and loaded from the package again.
"""

from __future__ import annotations

import hashlib
import os
import threading
from functools import cache
from pathlib import Path

# Before transformers or huggingface_hub is imported anywhere in this process: no network, ever.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from app import pretrained as catalog  # noqa: E402
from app.jobs.errors import UserError  # noqa: E402
from app.jobs.schemas import PretrainedConfig  # noqa: E402

INPUT_KIND = "pretrained_tokens"
_hash_lock = threading.Lock()
_hashes: dict[tuple[str, int, int], str] = {}


def locate(name: str) -> tuple[catalog.PretrainedModel, Path]:
    """The catalog entry and installed folder of ``name``, its weights checked; else a UserError."""
    entry = catalog.get(name)
    if entry is None:
        raise UserError(f"no pretrained model {name!r}; the catalog has {', '.join(catalog.catalog())}")
    folder = entry.directory()
    if folder is None:
        raise UserError(f"pretrained model {name!r} is not installed on this worker; {entry.install_hint()}")
    found = weights_sha256(folder / entry.weights)
    if found != entry.sha256:
        raise UserError(f"pretrained model {name!r}: its weights' sha256 is {found}, the catalog says {entry.sha256}")
    return entry, folder


def weights_sha256(path: Path) -> str:
    """The sha256 of a weights file, computed once per (path, size, mtime) in this process."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    with _hash_lock:
        if key not in _hashes:
            digest = hashlib.sha256()
            with path.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
            _hashes[key] = digest.hexdigest()
        return _hashes[key]


@cache
def _auto_tokenizer(name: str):
    from transformers import AutoTokenizer

    _, folder = locate(name)
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


class PretrainedTokenizer:
    """A catalog model's own tokenizer: texts to rows of ``max_length`` ids, truncated and padded."""

    def __init__(self, name: str, max_length: int):
        self.name, self.max_length = name, max_length
        self.pad_id = int(_auto_tokenizer(name).pad_token_id or 0)

    def encode(self, texts) -> np.ndarray:
        """Token ids (rows, max_length); the network drops the columns that are padding in a whole batch."""
        encoded = _auto_tokenizer(self.name)(list(texts), max_length=self.max_length, truncation=True,
                                              padding="max_length", return_tensors="np")
        return encoded["input_ids"].astype(np.int64)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of the real tokens' vectors (sentence-transformers' pooling for MiniLM)."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


class PretrainedNetwork(nn.Module):
    """A catalog encoder, mean-pooled, with dropout and a linear head.

    ``state_dict`` holds only the parameters that train, so checkpoints stay small and the frozen
    base is never copied into them; ``load_state_dict`` expects exactly those.
    """

    def __init__(self, config: PretrainedConfig, num_outputs: int):
        super().__init__()
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # worker logs are JSON lines, not progress bars
        entry, folder = locate(config.base)
        self.base_name, self.base_sha256 = entry.name, entry.sha256
        self.pad_id = PretrainedTokenizer(config.base, config.max_length).pad_id
        encoder = AutoModel.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
        if config.freeze == "embeddings":
            for parameter in encoder.get_input_embeddings().parameters():
                parameter.requires_grad_(False)
            for parameter in getattr(encoder, "embeddings", encoder.get_input_embeddings()).parameters():
                parameter.requires_grad_(False)
        elif config.freeze == "all_but_head":
            encoder.requires_grad_(False)
        if config.lora is not None:
            from peft import LoraConfig, get_peft_model

            # get_peft_model freezes every base weight; only the adapters train.
            encoder = get_peft_model(encoder, LoraConfig(
                r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
                target_modules=list(config.lora.target_modules), bias="none"))
        self.encoder = encoder
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(entry.hidden_size, num_outputs)
        self._trainable = {name for name, p in self.named_parameters() if p.requires_grad}

    def encode(self, ids: torch.Tensor) -> torch.Tensor:
        """Mean-pooled sentence vectors of a batch of token-id rows."""
        mask = ids != self.pad_id
        # Padding per batch: drop the columns that no row of this batch uses.
        width = max(int(mask.sum(dim=1).max()), 1)
        ids, mask = ids[:, :width], mask[:, :width]
        hidden = self.encoder(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        return mean_pool(hidden, mask)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits (classification) or standardised values (regression)."""
        return self.head(self.dropout(self.encode(ids)))

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Unit-norm sentence embeddings."""
        return F.normalize(self.encode(ids).float(), p=2, dim=-1)

    def state_dict(self, *args, **kwargs):
        """The trainable parameters only (the frozen base comes from the package)."""
        full = super().state_dict(*args, **kwargs)
        return type(full)((k, v) for k, v in full.items() if k in self._trainable)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load trainable parameters saved by :meth:`state_dict`."""
        if strict and set(state_dict) != self._trainable:
            raise RuntimeError(f"expected the trainable parameters {sorted(self._trainable)[:5]}...")
        return super().load_state_dict(state_dict, strict=False, assign=assign)

    def merge_adapters(self) -> None:
        """Fold LoRA adapters into the base weights for serving (no-op without LoRA)."""
        if hasattr(self.encoder, "merge_and_unload"):
            self.encoder = self.encoder.merge_and_unload()


def build_network(config: PretrainedConfig, num_outputs: int) -> PretrainedNetwork:
    """A fresh fine-tuning network for ``config``."""
    return PretrainedNetwork(config, num_outputs)


def check_base(signature: dict) -> None:
    """Refuse a fine-tuned model whose base weights differ from the ones it was trained on."""
    entry, _ = locate(signature["base"])
    if signature.get("base_sha256") != entry.sha256:
        raise UserError(f"this model was fine-tuned from {signature['base']} weights with sha256 "
                        f"{signature.get('base_sha256')}; the installed ones have {entry.sha256}")

