"""The wide paths of text classifiers: linear models fitted first as the TF-IDF + logistic-regression baseline.

- :class:`WideTerms`: over the whole text's word n-grams (:class:`worker.ml.text.WordNgrams`),
  read after the token ids; the wide path of every token-reading classifier;
- :class:`WideTfidf`: over the TF-IDF features that ``mlp`` + ``tfidf`` reads;
- :class:`WideNgrams`: over the token ids' n-grams, hashed; kept for checkpoints saved with it.

Each is fitted by :func:`fit_logistic` before the network trains, then frozen; the network's
head starts at zero on top of it (``worker.ml.training``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from worker.ml.text import PAD_ID


class WideNgrams(nn.Module):
    """The wide path of a text classifier before :class:`WideTerms`: a linear model over a text's bag of token n-grams.

    Kept so that checkpoints saved with it resume and predict as they were trained.

    A single token is its own id; a run of 2 to ``ngram_max`` real tokens is hashed into one of
    ``buckets`` ids after the vocabulary. Each n-gram of a text weighs its inverse document
    frequency in the training split (``idf``, a saved buffer that :meth:`fit_idf` sets; smoothed as
    scikit-learn's), divided by the length of the text's vector of those weights, so a text's bag
    is a TF-IDF row as the linear baseline reads it. Training fits the n-gram weights first, to
    convergence, as the TF-IDF + logistic-regression baseline (:meth:`fit`), then freezes them and
    trains the deep body and head, the head starting at zero, on top: the wide & deep recipe, where
    the deep part adds what word order and embeddings tell to a fully fitted linear model.
    """

    HASH_PRIME, HASH_MODULUS = 1_000_003, 2_147_483_647

    def __init__(self, vocab_size: int, buckets: int, ngram_max: int, num_outputs: int):
        super().__init__()
        self.vocab_size, self.buckets, self.ngram_max = vocab_size, buckets, ngram_max
        size = vocab_size + (buckets if ngram_max > 1 else 0)
        self.weight = nn.Embedding(size, num_outputs)
        nn.init.zeros_(self.weight.weight)
        self.register_buffer("idf", torch.ones(size))

    @torch.no_grad()
    def fit_idf(self, ids: torch.Tensor) -> None:
        """Set ``idf`` from the token ids of the training texts: ln((1 + texts) / (1 + texts with the n-gram)) + 1."""
        grams, weights, _ = self.grams(ids.to(self.idf.device))
        rows = torch.arange(len(grams), device=grams.device).unsqueeze(1).expand_as(grams)
        real = weights > 0
        # Each (text, n-gram) pair once: a text counts once however often it repeats an n-gram.
        pairs = torch.unique(rows[real] * len(self.idf) + grams[real])
        df = torch.bincount(pairs % len(self.idf), minlength=len(self.idf))
        self.idf.copy_(torch.log((1.0 + len(grams)) / (1.0 + df.to(self.idf.dtype))) + 1.0)

    def fit(self, ids: torch.Tensor, targets: torch.Tensor, *, c: float = 10.0, max_iter: int = 100) -> torch.Tensor:
        """Fit the n-gram weights as the TF-IDF + logistic-regression baseline (:func:`fit_logistic`); its bias.

        ``c`` = 10 was measured on the fortunes corpus (split seeds 0-4, against TF-IDF + LR): C=1
        trails the baseline by 0.04 on average, C=10 by 0.01 (C=30 no better).
        """
        grams, weights, _ = self.grams(ids.to(self.idf.device))
        return fit_logistic(self.weight.weight,
                            lambda w: nn.functional.embedding_bag(grams, w, per_sample_weights=weights, mode="sum"),
                            targets, outputs=self.weight.weight.shape[1], c=c, max_iter=max_iter)

    def grams(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Ids (batch, grams) of every n-gram, their weights, and how many n-grams of each length."""
        mask = ids != PAD_ID
        grams, masks, lengths = [ids], [mask], [ids.shape[1]]
        hashed, real = ids, mask
        for n in range(2, self.ngram_max + 1):
            hashed = (hashed[:, :-1] * self.HASH_PRIME + ids[:, n - 1:]) % self.HASH_MODULUS
            real = real[:, :-1] & mask[:, n - 1:]
            grams.append(self.vocab_size + hashed % self.buckets)
            masks.append(real)
            lengths.append(hashed.shape[1])
        grams = torch.cat(grams, dim=1)
        weights = torch.cat(masks, dim=1).to(torch.float32) * self.idf[grams]
        weights = weights / weights.square().sum(dim=1, keepdim=True).sqrt().clamp(min=1e-12)
        return grams, weights, lengths

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits (batch, outputs)."""
        grams, weights, _ = self.grams(ids)
        return (self.weight(grams) * weights.unsqueeze(-1)).sum(dim=1)

    def per_token(self, ids: torch.Tensor) -> torch.Tensor:
        """The logits split over the tokens (batch, tokens, outputs): each n-gram's share goes in
        equal parts to its tokens, so a text's shares sum to :meth:`forward`."""
        grams, weights, lengths = self.grams(ids)
        parts = (self.weight(grams) * weights.unsqueeze(-1)).split(lengths, dim=1)
        shares = torch.zeros(*ids.shape, parts[0].shape[-1], dtype=parts[0].dtype, device=ids.device)
        for n, part in enumerate(parts, start=1):
            for offset in range(n):
                shares[:, offset:offset + part.shape[1]] += part / n
        return shares


class WideTerms(nn.Module):
    """The wide path of a token-reading classifier: a linear model over the text's word n-grams.

    It reads what :class:`worker.ml.text.WordNgrams` appends to the token ids: the ids of a text's
    distinct n-grams (0 pads) and their counts. Each weighs (1 + ln count) x its idf in the
    training split (``idf``, a saved buffer set from the fit), divided by the length of the
    text's vector of those weights: the TF-IDF row of the baseline, over the whole text. Training
    fits the weights first, to convergence, as the TF-IDF + logistic-regression baseline
    (:meth:`fit`), then freezes them and trains the deep body and head, the head starting at
    zero, on top: the wide & deep recipe, where the deep part adds what word order and embeddings
    tell to a fully fitted linear model.
    """

    def __init__(self, terms: int, num_outputs: int):
        super().__init__()
        self.terms = nn.Embedding(terms + 1, num_outputs, padding_idx=0)
        nn.init.zeros_(self.terms.weight)
        self.register_buffer("idf", torch.ones(terms + 1))

    def fit(self, columns: torch.Tensor, targets: torch.Tensor, *, c: float = 10.0, max_iter: int = 100) -> torch.Tensor:
        """Fit the n-gram weights as the TF-IDF + logistic-regression baseline (:func:`fit_logistic`); its bias."""
        ids, weights = self.weighted(columns.to(self.idf.device))
        return fit_logistic(self.terms.weight,
                            lambda w: nn.functional.embedding_bag(ids, w, per_sample_weights=weights, mode="sum"),
                            targets, outputs=self.terms.weight.shape[1], c=c, max_iter=max_iter)

    def weighted(self, columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The n-gram ids (batch, width) and their TF-IDF weights, each row of unit length."""
        ids, counts = columns.chunk(2, dim=1)
        tf = torch.where(counts > 0, 1.0 + torch.log(counts.clamp(min=1).to(torch.float32)), 0.0)
        weights = tf * self.idf[ids]
        return ids, weights / weights.square().sum(dim=1, keepdim=True).sqrt().clamp(min=1e-12)

    def per_term(self, columns: torch.Tensor) -> torch.Tensor:
        """Each n-gram's share of the logits (batch, width, outputs); a text's shares sum to :meth:`forward`."""
        ids, weights = self.weighted(columns)
        return self.terms(ids) * weights.unsqueeze(-1)

    def forward(self, columns: torch.Tensor) -> torch.Tensor:
        """Logits (batch, outputs)."""
        return self.per_term(columns).sum(dim=1)


class WideTfidf(nn.Module):
    """The wide path of ``mlp`` + ``tfidf``: a linear model over the TF-IDF features the MLP reads.

    Fitted first as the TF-IDF + logistic-regression baseline (:func:`fit_logistic`), then frozen,
    as :class:`WideTerms` is for the token-reading classifiers.
    """

    def __init__(self, features: int, num_outputs: int):
        super().__init__()
        self.weight = nn.Linear(features, num_outputs, bias=False)
        nn.init.zeros_(self.weight.weight)

    def fit(self, features: torch.Tensor, targets: torch.Tensor, *, c: float = 10.0,
            max_iter: int = 100) -> torch.Tensor:
        """Fit the weights as a logistic regression over ``features`` (rows, features); its bias."""
        return fit_logistic(self.weight.weight, lambda w: features @ w.T, targets,
                            outputs=self.weight.weight.shape[0], c=c, max_iter=max_iter)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits (batch, outputs)."""
        return self.weight(features)


def fit_logistic(weight: torch.Tensor, logits_of: Callable[[torch.Tensor], torch.Tensor], targets: torch.Tensor, *,
                 outputs: int, c: float, max_iter: int) -> torch.Tensor:
    """Fit ``weight`` as an L2 multinomial logistic regression over ``outputs`` classes; its bias.

    ``logits_of(w)`` is every training row's logits under weights ``w`` (bias left out). The
    objective is scikit-learn's ``LogisticRegression(C=c)`` divided by the number of rows: mean
    cross-entropy + ||W||^2 / (2 c n), the bias unregularised, minimised full-batch by L-BFGS with
    a strong-Wolfe line search for at most ``max_iter`` iterations; so it reaches the baseline's
    solution over the same features. It draws no random numbers. The caller puts the bias in the
    network's head.
    """
    w = torch.zeros_like(weight, requires_grad=True)
    targets, n = targets.to(w.device), len(targets)
    b = torch.zeros(outputs, dtype=w.dtype, device=w.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=10,
                                  tolerance_grad=1e-6, tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(logits_of(w) + b, targets) + w.square().sum() / (2.0 * c * n)
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        weight.copy_(w)
    return b.detach()
