"""Explanations of predictions: integrated gradients (Captum) for every architecture, attention maps for transformers.

Attributions are computed for the output a prediction reports: the predicted class's logit for a
classifier, the (standardised) first value for regression and forecasting. Numeric inputs are
attributed in the model's standardised input space against the training mean (standardised
zero); text is attributed per token at the embedding layer against the all-padding embedding
(zero vectors), with the padding mask of the real text held fixed so the path is a straight line;
a text model's wide path (``model.wide``, linear in its n-grams) adds each token's exact share of
the wide logits (an n-gram's part split equally over its tokens), against zero for all padding;
where the wide path reads the text's word n-grams (``WideTerms``), each n-gram's exact share is
reported apart (``wide_terms``, ``wide_attributions``), and the two lists together sum to the difference.
Integrated gradients are complete: the attributions sum to f(input) - f(baseline); each
explanation reports that difference and how far the sum is from it (``completeness_error``).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from captum.attr import IntegratedGradients, LayerIntegratedGradients

from app.catalog import CLASSIFICATION, TEXT_CLASSIFICATION
from app.jobs.errors import UserError
from worker.ml.architectures import TransformerBody
from worker.ml.text import PAD_ID
from worker.ml.wide import WideTerms

INTEGRATED_GRADIENTS = "integrated_gradients"
ATTENTION = "attention"
DEFAULT_STEPS = 64
# Interpolation points evaluated in one forward pass (bounds memory for long inputs and many steps).
INTERNAL_BATCH = 2048


def explain(loaded, batch: torch.Tensor, outputs: np.ndarray, *, method: str = INTEGRATED_GRADIENTS,
            steps: int = DEFAULT_STEPS) -> list[dict]:
    """One explanation per row of ``batch`` (the encoded inputs), for the outputs already predicted."""
    if method == ATTENTION:
        return _attention(loaded, batch)
    if method != INTEGRATED_GRADIENTS:
        raise UserError(f"unknown explanation method {method!r}; use {INTEGRATED_GRADIENTS!r} or {ATTENTION!r}")
    return _integrated_gradients(loaded, batch, outputs, steps)


def _targets(loaded, outputs: np.ndarray) -> tuple[list[int], list[str]]:
    """The output index each row is explained for, and how an explanation names it."""
    if loaded.signature["task"] in (CLASSIFICATION, TEXT_CLASSIFICATION):
        classes = loaded.signature.get("classes") or list(range(outputs.shape[1]))
        index = [int(i) for i in outputs.argmax(axis=1)]
        return index, [f"logit of class {classes[i]!r}" for i in index]
    return [0] * len(outputs), ["first output (standardised)"] * len(outputs)


@contextlib.contextmanager
def _differentiable(device: torch.device):
    # cuDNN runs RNN backward passes only in training mode; the plain kernels accept eval mode.
    with torch.enable_grad(), (torch.backends.cudnn.flags(enabled=False) if device.type == "cuda"
                               else contextlib.nullcontext()):
        yield


def _integrated_gradients(loaded, batch: torch.Tensor, outputs: np.ndarray, steps: int) -> list[dict]:
    network, device = loaded.network, loaded.device
    targets, target_names = _targets(loaded, outputs)
    inputs = batch.to(device)
    target = torch.tensor(targets, device=device)
    per_term = None
    with _differentiable(device):
        if loaded.signature["input_kind"] == "tokens":
            inputs, wide_inputs = network.split(inputs)
            mask = inputs != PAD_ID
            baseline = torch.full_like(inputs, PAD_ID)

            def forward(ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
                return network.head(network.body(network.embedding(ids), keep))

            ig = LayerIntegratedGradients(forward, network.embedding)
            attributions, delta = ig.attribute(
                inputs, baselines=baseline, target=target, additional_forward_args=(mask,), n_steps=steps,
                internal_batch_size=INTERNAL_BATCH, return_convergence_delta=True,
            )
            per_input = attributions.sum(dim=-1)  # one number per token: summed over the embedding
            end = forward(inputs, mask)
            start = forward(baseline, mask)
            if isinstance(network.wide, WideTerms):  # no n-gram in the baseline: its wide logits are 0
                shares = network.wide.per_term(wide_inputs)
                per_term = shares.gather(2, target.view(-1, 1, 1).expand(-1, shares.shape[1], 1)).squeeze(2)
                end = end + network.wide(wide_inputs)
            elif network.wide is not None:  # all padding has no n-gram: its wide logits are 0
                shares = network.wide.per_token(inputs)
                per_input = per_input + shares.gather(2, target.view(-1, 1, 1).expand(-1, shares.shape[1], 1)).squeeze(2)
                end = end + network.wide(inputs)
        else:
            baseline = torch.zeros_like(inputs)
            ig = IntegratedGradients(network)
            per_input, delta = ig.attribute(
                inputs, baselines=baseline, target=target, n_steps=steps,
                internal_batch_size=INTERNAL_BATCH, return_convergence_delta=True,
            )
            end, start = network(inputs), network(baseline)
    rows = torch.arange(len(targets), device=device)
    difference = (end[rows, target] - start[rows, target]).detach().double().cpu().numpy()
    per_input = per_input.detach().double().cpu().numpy()
    per_term = per_term.detach().double().cpu().numpy() if per_term is not None else None
    delta = delta.detach().double().cpu().numpy()
    explanations = []
    for i in range(len(targets)):
        explanation = {
            "method": INTEGRATED_GRADIENTS, "steps": steps, "target": target_names[i],
            "output_difference": float(difference[i]), "completeness_error": float(abs(delta[i])),
        }
        if loaded.signature["input_kind"] == "tokens":
            ids, wide_inputs = network.split(batch[i:i + 1])
            real = int((ids != PAD_ID).sum())
            explanation["tokens"] = _tokens(loaded, ids[0], real)
            explanation["attributions"] = [float(v) for v in per_input[i, :real]]
            explanation["baseline"] = "padding (zero embedding) for every token"
            if per_term is not None:
                explanation.update(_wide_terms(loaded, wide_inputs[0], per_term[i]))
        else:
            shape = [int(n) for n in loaded.signature["input_shape"]]
            explanation["attributions"] = per_input[i].reshape(shape).tolist()
            explanation["baseline"] = _numeric_baseline(loaded, shape)
        explanations.append(explanation)
    return explanations


def _wide_terms(loaded, columns: torch.Tensor, shares: np.ndarray) -> dict:
    """The word n-grams the wide path read in a text, and each one's share of the explained logit."""
    terms = loaded.tokenizer.ngrams.terms
    ids = columns[:len(columns) // 2].tolist()
    kept = [j for j, term in enumerate(ids) if term > 0]
    return {"wide_terms": [terms[ids[j] - 1] for j in kept], "wide_attributions": [float(shares[j]) for j in kept]}


def _numeric_baseline(loaded, shape: list[int]) -> dict:
    """The baseline in the units the inputs were sent in: the training mean (zero when not standardised)."""
    zeros = np.zeros([1, *shape])
    values = loaded.features.invert(zeros)[0] if loaded.features is not None else zeros[0]
    kind = "training mean" if loaded.features is not None else "zero"
    return {"kind": kind, "values": np.broadcast_to(values, shape).tolist()}


def _tokens(loaded, ids: torch.Tensor, count: int) -> list[str]:
    vocabulary = loaded.tokenizer.vocabulary
    return [vocabulary[int(t)] for t in ids[:count]]


def _attention(loaded, batch: torch.Tensor) -> list[dict]:
    """Attention weights per layer and head: ``[layers][heads][seq][seq]``, rows summing to 1.

    ``seq`` counts the real steps (tokens without padding), plus a leading ``[CLS]`` position when
    the model pools by it.
    """
    network = loaded.network
    body = getattr(network, "body", None)
    if not isinstance(body, TransformerBody):
        raise UserError("attention maps exist only for transformer models; use integrated_gradients")
    captured: list[torch.Tensor] = []

    def ask_for_weights(_module, args, kwargs):
        return args, {**kwargs, "need_weights": True, "average_attn_weights": False}

    def keep_weights(_module, _args, output):
        captured.append(output[1].detach().float().cpu())

    handles = []
    for layer in body.encoder.layers:
        # A hook also turns off the fused inference path, which never computes the weights.
        handles.append(layer.self_attn.register_forward_pre_hook(ask_for_weights, with_kwargs=True))
        handles.append(layer.self_attn.register_forward_hook(keep_weights))
    try:
        with torch.no_grad():
            network(batch.to(loaded.device))
    finally:
        for handle in handles:
            handle.remove()
    weights = torch.stack(captured, dim=1)  # (batch, layers, heads, seq, seq)
    offset = 1 if body.cls is not None else 0
    explanations = []
    for i in range(len(batch)):
        if loaded.signature["input_kind"] == "tokens":
            ids = network.split(batch[i:i + 1])[0][0]
            real = int((ids != PAD_ID).sum())
            tokens = (["[CLS]"] if offset else []) + _tokens(loaded, ids, real)
        else:
            real = int(loaded.signature["sequence_shape"][0])
            tokens = (["[CLS]"] if offset else []) + [f"step {s}" for s in range(real)]
        seq = real + offset
        explanations.append({
            "method": ATTENTION, "shape": ["layers", "heads", "seq", "seq"], "positions": tokens,
            "attention": weights[i, :, :, :seq, :seq].tolist(),
        })
    return explanations
