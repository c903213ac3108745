"""Text generators: a causal LM on Debian's fortunes, generation (seeds, key/value cache), exact resume,
BPE tokenizers in the checkpoint, and a seq2seq transformer that learns to reverse sequences.

The corpus is the ``fortunes`` file of Debian's fortunes package (``builtin:fortunes``, docs/results.md).
"""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load as load_tensors

from app.jobs.errors import UserError
from worker.ml import checkpoints, prediction
from worker.ml.datasets import load_table
from worker.ml.generation import Sampling, generate_one
from worker.ml.preparation import prepare
from worker.ml.training import train

LM = {"d_model": 64, "nhead": 4, "num_layers": 2, "dim_feedforward": 128, "block_size": 32, "dropout": 0.1}
SYMBOLS = "abcdefgh"


@pytest.fixture(scope="module")
def lm(fake_hooks, spec_for):
    """A small character-level LM trained for 10 epochs on builtin:fortunes: (spec, hooks, result)."""
    spec = spec_for("causal_lm", "builtin:fortunes", model=LM, epochs=10, batch_size=32, learning_rate=3e-3,
                     log_every_steps=5)
    hooks = fake_hooks()
    result = train(spec, hooks=hooks)
    return spec, hooks, result


def unigram_perplexity(spec) -> float:
    """Perplexity on the validation tokens of token frequencies counted on the training tokens (add-one)."""
    data = prepare(spec.dataset, load_table(spec.dataset, None, None), spec.model)
    vocab = data.signature["vocab_size"]
    counts = Counter(data.splits["train"][1].ravel().tolist())
    total = sum(counts.values()) + vocab
    val = data.splits["val"][1].ravel().tolist()
    return math.exp(-sum(math.log((counts[t] + 1) / total) for t in val) / len(val))


def test_language_model_beats_a_unigram_model_and_reports_perplexity(lm):
    spec, hooks, result = lm
    epochs = hooks.scope("epoch")
    assert {"train_loss", "val_loss", "val_perplexity"} <= set(epochs[-1][2])
    assert all(set(v) == {"train_loss", "lr"} for _, _, v in hooks.scope("step")) and hooks.scope("step")
    for _, _, values in epochs:
        assert values["val_perplexity"] == pytest.approx(math.exp(values["val_loss"]))
    baseline = unigram_perplexity(spec)
    assert epochs[-1][2]["val_perplexity"] < 0.8 * baseline, (epochs[-1][2], baseline)
    assert {"test_loss", "test_perplexity"} == set(result.test_metrics)
    assert result.signature["task"] == "language_modeling" and result.signature["tokenizer"] == "char"


def _served(hooks):
    return hooks.checkpoints[-1].data


def test_same_seed_same_text_another_seed_other_text(lm):
    _, hooks, _ = lm
    ckpt = _served(hooks)
    sampling = Sampling(max_new_tokens=40, temperature=1.0, seed=11)
    first = prediction.generate(ckpt, ["The ", "Life is"], sampling)
    again = prediction.generate(ckpt, ["The ", "Life is"], sampling)
    other = prediction.generate(ckpt, ["The ", "Life is"], Sampling(max_new_tokens=40, temperature=1.0, seed=12))
    assert first == again and first["seed"] == 11
    assert [g["text"] for g in first["generations"]] != [g["text"] for g in other["generations"]]
    assert all(g["tokens"] == 40 and g["finish_reason"] == "length" for g in first["generations"])


def test_stop_strings_end_the_text_and_pieces_add_up_to_it(lm):
    _, hooks, _ = lm
    ckpt = _served(hooks)
    full = prediction.generate(ckpt, ["A"], Sampling(max_new_tokens=60, temperature=0.0))["generations"][0]["text"]
    # A stop string that first occurs after a few characters, so some text comes before it.
    stop = next(full[i:i + 2] for i in range(5, len(full) - 1) if full.index(full[i:i + 2]) == i)
    pieces: list[tuple[int, str]] = []
    out = prediction.generate(ckpt, ["A"], Sampling(max_new_tokens=60, temperature=0.0, stop=(stop,)),
                              on_text=lambda i, text: pieces.append((i, text)))["generations"][0]
    assert out["finish_reason"] == "stop" and out["text"] == full[:full.index(stop)]
    assert "".join(t for _, t in pieces) == out["text"] and len(pieces) > 1


@pytest.mark.parametrize("sampling", [Sampling(max_new_tokens=50, temperature=0.0),
                                      Sampling(max_new_tokens=50, temperature=0.9, top_k=20, top_p=0.95)],
                         ids=["greedy", "sampled"])
def test_key_value_cache_gives_the_same_tokens_as_recomputing(lm, sampling):
    _, hooks, _ = lm
    loaded = prediction.load_model(_served(hooks), torch.device("cpu"))
    # 9 prompt tokens + 50 new ones run past block_size (32): the cache and the sliding window both serve.
    args = (loaded.network, loaded.tokenizer, "Knowledge", sampling, 5)
    cached = generate_one(*args, device=loaded.device, use_cache=True)
    recomputed = generate_one(*args, device=loaded.device, use_cache=False)
    assert cached == recomputed and cached["tokens"] == 50
    model = loaded.network
    ids = torch.tensor([loaded.tokenizer.encode("Knowledge is power")])
    cache = model.new_cache()
    stepwise = torch.cat([model.step(ids[:, :4], cache)] + [model.step(ids[:, i:i + 1], cache)
                                                             for i in range(4, ids.shape[1])], dim=1)
    torch.testing.assert_close(stepwise, model(ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("positional", ["learned", "rotary"])
def test_stop_then_resume_matches_an_uninterrupted_run(spec_for, fake_hooks, positional):
    spec = spec_for("causal_lm", "builtin:fortunes", model={**LM, "d_model": 32, "dim_feedforward": 64,
                                                             "positional": positional},
                    epochs=2, batch_size=64, scheduler="cosine")
    straight_hooks = fake_hooks()
    train(spec, hooks=straight_hooks)
    stopped_hooks = fake_hooks(stop_at_step=11, stop_reason_value="shutdown")
    assert train(spec, hooks=stopped_hooks).stopped == "shutdown"
    resumed_hooks = fake_hooks()
    train(spec, hooks=resumed_hooks, resume=stopped_hooks.checkpoints[-1].data)
    a, b = (load_tensors(h.checkpoints[-1].data) for h in (straight_hooks, resumed_hooks))
    names = sorted(k for k in a if k.startswith("model."))
    assert names and names == sorted(k for k in b if k.startswith("model."))
    for name in names:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0)
    assert [v["val_loss"] for _, _, v in resumed_hooks.scope("epoch")] == pytest.approx(
        [v["val_loss"] for _, _, v in straight_hooks.scope("epoch")][1:], abs=1e-6)


def test_a_bpe_tokenizer_travels_in_the_checkpoint_with_its_sha256(spec_for, fake_hooks):
    spec = spec_for("causal_lm", "builtin:fortunes", model={**LM, "tokenizer": "bpe", "vocab_size": 300,
                                                             "num_layers": 1}, epochs=1, batch_size=32)
    hooks = fake_hooks()
    result = train(spec, hooks=hooks)
    data = hooks.checkpoints[-1].data
    saved = checkpoints.decode(data)
    assert result.signature["tokenizer"] == "bpe" and 256 < result.signature["vocab_size"] <= 300
    assert json.loads(saved.tokenizer)["kind"] == "bpe"
    out = prediction.generate(data, ["The "], Sampling(max_new_tokens=8, seed=1))["generations"][0]
    assert out["tokens"] == 8 and out["text"]
    # Another tokenizer under the same signature is refused before anything is generated.
    tampered = checkpoints.encode(checkpoints.Checkpoint(
        model=saved.model, signature=saved.signature, spec=saved.spec,
        tokenizer=saved.tokenizer.replace('"kind": "bpe"', '"kind":  "bpe"')))
    prediction.clear_cache()
    with pytest.raises(UserError, match="sha256"):
        prediction.generate(tampered, ["The "], Sampling(max_new_tokens=2))


def reversal_pairs(n: int, rng: np.random.Generator) -> list[tuple[str, str]]:
    """``n`` sequences of 5 symbols over 8, each with its reverse, as space-separated words."""
    rows = rng.integers(0, len(SYMBOLS), size=(n, 5))
    return [(" ".join(SYMBOLS[i] for i in r), " ".join(SYMBOLS[i] for i in r[::-1])) for r in rows]


def test_seq2seq_learns_to_reverse_sequences(tmp_path, spec_for, fake_hooks):
    rng = np.random.default_rng(0)
    pairs = reversal_pairs(3000, rng)
    path = tmp_path / "reverse.csv"
    pd.DataFrame(pairs, columns=["source", "target"]).to_csv(path, index=False)
    spec = spec_for("seq2seq", "dataset:1",
                    model={"d_model": 64, "nhead": 4, "num_encoder_layers": 2, "num_decoder_layers": 2,
                           "dim_feedforward": 128, "dropout": 0.0, "max_source_tokens": 6, "max_target_tokens": 6},
                    data={"task": "sequence_to_sequence", "text_column": "source", "target": "target"},
                    epochs=8, batch_size=64, learning_rate=2e-3, scheduler="cosine")
    hooks = fake_hooks()
    result = train(spec, hooks=hooks, dataset_file=path, dataset_format="csv")
    assert {"val_loss", "val_perplexity", "val_exact_match"} <= set(hooks.scope("epoch")[-1][2])
    seen = {s for s, _ in pairs}
    fresh = [p for p in reversal_pairs(400, np.random.default_rng(1)) if p[0] not in seen][:200]
    data = hooks.checkpoints[-1].data
    for beams in (1, 3):
        out = prediction.generate(data, [s for s, _ in fresh], Sampling(beam_size=beams))["generations"]
        exact = np.mean([o["text"] == t for o, (_, t) in zip(out, fresh)])
        assert exact >= 0.95, (beams, exact, result.final_metrics)
