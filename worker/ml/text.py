"""Tokenizers and features for text classification, built from the training split of the job itself.

- :class:`Tokenizer`: lower-cased words, the most frequent kept;
- :class:`SubwordTokenizer`: byte-level BPE of the ``tokenizers`` library (:func:`train_subword`,
  shared with the language models' byte-level BPE in ``worker.ml.text_codecs``);
- :class:`TfidfFeaturizer`: bag-of-n-grams weighted by TF-IDF for ``mlp``; scikit-learn fits it,
  and it is kept as plain data (n-grams and idf weights), never a pickle;
- :class:`WordNgrams`: the word n-grams that the wide path of a token-reading classifier reads,
  appended to the token ids (:class:`WithWordNgrams`); kept as plain data too.
"""

from __future__ import annotations

import json
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


def train_subword(texts: Iterable[str], *, kind: str, vocab_size: int, specials: list[str] | None = None,
                  lowercase: bool = False, byte_level: bool = True):
    """A ``tokenizers`` BPE trained on ``texts`` (byte-level unless told otherwise, so it meets no unknown byte).

    ``specials`` take the first ids, in order; ``lowercase`` adds NFKC and lower-casing, and a space
    before the first word so that it is cut as it would be mid-text.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

    if kind != "bpe":
        raise ValueError(f"unknown subword tokenizer {kind!r}")
    # WordPiece is left out on purpose: its trainer in tokenizers 0.23 gives a different vocabulary
    # from run to run on the same texts (even single-threaded), and a job must be reproducible.
    tokenizer = HFTokenizer(models.BPE())
    if byte_level:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=lowercase)
        tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials or []), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if byte_level else [])
    if lowercase:
        tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.train_from_iterator(list(texts), trainer=trainer)
    return tokenizer


class SubwordTokenizer:
    """Lower-cased text to a fixed-length row of byte-level BPE ids; id 0 pads, id 1 fills an empty text."""

    def __init__(self, kind: str, tokenizer, max_tokens: int):
        self.kind, self.tokenizer, self.max_tokens = kind, tokenizer, max_tokens

    @classmethod
    def build(cls, texts: Iterable[str], *, kind: str, vocab_size: int, max_tokens: int) -> "SubwordTokenizer":
        """A ``kind`` ("bpe") tokenizer of at most ``vocab_size`` ids trained on ``texts``."""
        return cls(kind, train_subword(texts, kind=kind, vocab_size=vocab_size, specials=[PAD_TOKEN, UNKNOWN_TOKEN],
                                       lowercase=True), max_tokens)

    @property
    def vocabulary(self) -> list[str]:
        """Token of each id (explanations name tokens by it)."""
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        tokens = [""] * (max(vocab.values()) + 1)
        for token, i in vocab.items():
            tokens[i] = token
        return tokens

    def encode(self, texts: Iterable[str]) -> np.ndarray:
        """Token ids (rows, max_tokens), truncated or right-padded; an empty text is one unknown."""
        encoded = self.tokenizer.encode_batch(list(texts))
        ids = np.full((len(encoded), self.max_tokens), PAD_ID, dtype=np.int64)
        for row, one in enumerate(encoded):
            tokens = one.ids[: self.max_tokens]
            ids[row, : max(len(tokens), 1)] = tokens or [UNKNOWN_ID]
        return ids

    def to_json(self) -> str:
        """The tokenizer as a JSON document (the library's own serialisation inside)."""
        return json.dumps({"kind": f"subword-{self.kind}", "max_tokens": self.max_tokens, "tokenizer": self.tokenizer.to_str()})

    @classmethod
    def from_json(cls, document: str) -> "SubwordTokenizer":
        """The tokenizer saved by :meth:`to_json`."""
        from tokenizers import Tokenizer as HFTokenizer

        saved = json.loads(document)
        return cls(saved["kind"].removeprefix("subword-"), HFTokenizer.from_str(saved["tokenizer"]), int(saved["max_tokens"]))


@dataclass
class TfidfFeaturizer:
    """Texts to L2-normalised TF-IDF vectors over the word n-grams kept from the training split.

    ``words``: ``"scikit-learn"`` reads words as scikit-learn's default does (two or more word
    characters), as the TF-IDF + logistic-regression baseline; ``"kiln"`` (featurizers fitted
    before that) reads them as the word tokenizer does (:func:`words`).
    """

    ngrams: list[str]
    idf: np.ndarray
    ngram_max: int
    sublinear_tf: bool
    words: str = "kiln"

    @classmethod
    def fit(cls, texts: list[str], *, ngram_max: int, max_features: int, min_df: int,
            sublinear_tf: bool) -> "TfidfFeaturizer":
        """Keep the ``max_features`` most frequent n-grams of ``texts`` (scikit-learn's words) and their smoothed idf."""
        from sklearn.feature_extraction.text import TfidfVectorizer

        vectorizer = TfidfVectorizer(max_features=max_features, min_df=min_df,
                                     sublinear_tf=sublinear_tf, ngram_range=(1, ngram_max))
        try:
            vectorizer.fit(texts)
        except ValueError:  # no n-gram survives (empty texts, or min_df above every count)
            from app.jobs.errors import UserError

            raise UserError("the training texts leave no n-gram for TF-IDF features; lower model.tfidf.min_df") from None
        names = vectorizer.get_feature_names_out().tolist()
        return cls(names, vectorizer.idf_.astype(np.float64), ngram_max, sublinear_tf, "scikit-learn")

    def transform(self, texts: Iterable[str]) -> np.ndarray:
        """Features (rows, n-grams) as float32 (weighted while sparse; only the result is dense)."""
        from sklearn.feature_extraction.text import CountVectorizer
        from sklearn.preprocessing import normalize

        reading = ({"ngram_range": (1, self.ngram_max)} if self.words == "scikit-learn"
                   else {"analyzer": _analyzer(self.ngram_max)})
        counts = CountVectorizer(vocabulary=self.ngrams, **reading).transform(list(texts))
        tf = counts.astype(np.float64)
        if self.sublinear_tf:
            tf.data = 1.0 + np.log(tf.data)
        weighted = normalize(tf.multiply(self.idf[None, :]).tocsr(), norm="l2")
        return weighted.astype(np.float32).toarray()


@dataclass
class WordNgrams:
    """The wide path's features: a text's word n-grams as the TF-IDF + logistic-regression baseline reads them.

    scikit-learn's default word analysis of the whole text (lower-cased, words of two or more
    word characters, 1- to ``ngram_max``-grams), whatever tokenizer the deep part reads; the
    n-grams and their idf are fitted on the training split. A text is encoded as ``width`` ids
    (1-based positions in ``terms`` of its distinct known n-grams, 0 pads) then their ``width``
    counts; the wide path weighs them (sublinear tf, idf, unit length) as the baseline does.
    A text with more distinct n-grams than ``width`` (the most of any training text, at most
    :attr:`MAX_WIDTH`) keeps the first ``width`` of them in ``terms`` order.
    """

    MAX_WIDTH = 1024

    terms: list[str]
    ngram_max: int
    width: int

    @classmethod
    def fit(cls, texts: list[str], *, ngram_max: int, max_terms: int) -> tuple["WordNgrams", np.ndarray]:
        """The ``max_terms`` most frequent n-grams of ``texts``, and their smoothed idf."""
        from sklearn.feature_extraction.text import TfidfVectorizer

        vectorizer = TfidfVectorizer(ngram_range=(1, ngram_max), sublinear_tf=True, max_features=max_terms)
        try:
            counts = vectorizer.fit_transform(texts)
        except ValueError:  # no word of two letters in any training text: one never-matching term
            return cls([""], ngram_max, 1), np.ones(1)
        width = int(np.diff(counts.indptr).max(initial=1))
        return (cls(vectorizer.get_feature_names_out().tolist(), ngram_max, min(max(width, 1), cls.MAX_WIDTH)),
                vectorizer.idf_.astype(np.float64))

    def encode(self, texts: Iterable[str]) -> np.ndarray:
        """Term ids and counts (rows, 2 * width), int64."""
        from sklearn.feature_extraction.text import CountVectorizer

        counts = CountVectorizer(vocabulary=self.terms, ngram_range=(1, self.ngram_max)).transform(list(texts))
        encoded = np.zeros((counts.shape[0], 2 * self.width), dtype=np.int64)
        for row in range(counts.shape[0]):
            start, end = counts.indptr[row], min(counts.indptr[row + 1], counts.indptr[row] + self.width)
            encoded[row, :end - start] = counts.indices[start:end] + 1
            encoded[row, self.width:self.width + end - start] = counts.data[start:end]
        return encoded


class WithWordNgrams:
    """A deep tokenizer's ids followed by the wide path's word n-grams (:class:`WordNgrams`)."""

    def __init__(self, tokenizer, ngrams: WordNgrams):
        self.tokenizer, self.ngrams = tokenizer, ngrams

    @property
    def vocabulary(self) -> list[str]:
        """The deep tokenizer's token of each id."""
        return self.tokenizer.vocabulary

    def encode(self, texts: Iterable[str]) -> np.ndarray:
        """Token ids (rows, max_tokens), then the n-grams' ids and counts (rows, 2 * width)."""
        texts = list(texts)
        return np.concatenate([self.tokenizer.encode(texts), self.ngrams.encode(texts)], axis=1)


def _analyzer(ngram_max: int):
    """The n-grams of a text as featurizers fitted before ``words="scikit-learn"`` read them: the word tokenizer's words and their runs."""

    def analyze(text: str) -> list[str]:
        tokens = words(text)
        grams = list(tokens)
        for n in range(2, ngram_max + 1):
            grams += [" ".join(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
        return grams

    return analyze


def lsa_vectors(ids: np.ndarray, vocab_size: int, dim: int, seed: int) -> np.ndarray:
    """Token vectors (vocab_size, dim) from latent semantic analysis of the training texts' token ids.

    The texts' TF-IDF token counts (padding and the unknown id left out) go through a seeded
    randomized SVD; a token's vector is its row of V * S, scaled to unit standard deviation, so
    that tokens used in the same texts start close together. Tokens the texts never use, and
    dimensions beyond the texts' rank, stay zero.
    """
    from scipy import sparse
    from sklearn.utils.extmath import randomized_svd

    rows = np.repeat(np.arange(len(ids)), ids.shape[1])
    flat = ids.reshape(-1)
    real = flat > UNKNOWN_ID
    counts = sparse.csr_matrix((np.ones(int(real.sum())), (rows[real], flat[real])), shape=(len(ids), vocab_size))
    counts.sum_duplicates()
    counts.data = 1.0 + np.log(counts.data)
    df = np.bincount(counts.indices, minlength=vocab_size)
    idf = np.log((1.0 + len(ids)) / (1.0 + df)) + 1.0
    weighted = sparse.csr_matrix(counts.multiply(idf[None, :]))
    norms = np.sqrt(np.asarray(weighted.multiply(weighted).sum(axis=1))).ravel()
    weighted = sparse.csr_matrix(weighted.multiply(1.0 / np.where(norms > 0, norms, 1.0)[:, None]))
    vectors = np.zeros((vocab_size, dim))
    rank = min(dim, min(weighted.shape) - 1)
    if rank < 1 or weighted.nnz == 0:
        return vectors
    _, singular, components = randomized_svd(weighted, n_components=rank, random_state=seed)
    vectors[:, :rank] = components.T * singular
    used = vectors[df > 0]
    scale = used.std() if used.size else 0.0
    return vectors / scale if scale > 0 else vectors
