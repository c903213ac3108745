"""Word-level tokenizer for text classification, built from the training split of the job itself."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from app import task_rules

PAD_ID = 0
UNKNOWN_ID = 1
PAD_TOKEN = "<pad>"
UNKNOWN_TOKEN = "<unk>"
words = task_rules.words  # one definition, so the submit check counts the words the model reads


@dataclass
class Tokenizer:
    """Maps text to a fixed-length row of token ids; id 0 pads, id 1 stands for unseen words."""

    vocabulary: list[str]
    max_tokens: int

    def __post_init__(self) -> None:
        self._ids = {word: i for i, word in enumerate(self.vocabulary)}

    @classmethod
    def build(cls, texts: Iterable[str], *, vocab_size: int, max_tokens: int) -> "Tokenizer":
        """The most frequent words of ``texts`` (ties alphabetical), capped at ``vocab_size`` ids."""
        counts = Counter(word for text in texts for word in words(text))
        ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
        kept = [word for word, _ in ranked[: max(vocab_size - 2, 0)]]
        return cls(vocabulary=[PAD_TOKEN, UNKNOWN_TOKEN, *kept], max_tokens=max_tokens)

    def encode(self, texts: Iterable[str]) -> np.ndarray:
        """Token ids (rows, max_tokens), truncated or right-padded; an empty text is one unknown."""
        texts = list(texts)
        ids = np.full((len(texts), self.max_tokens), PAD_ID, dtype=np.int64)
        for row, text in enumerate(texts):
            tokens = [self._ids.get(word, UNKNOWN_ID) for word in words(text)][: self.max_tokens]
            # Every row keeps at least one real token, so pooling never divides by an empty mask.
            ids[row, : max(len(tokens), 1)] = tokens or [UNKNOWN_ID]
        return ids
