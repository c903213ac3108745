"""Text generation: sampling from a ``causal_lm`` with a key/value cache, and seq2seq decoding.

Sampling draws one uniform number per token from a generator seeded by the request's ``seed``
(each prompt restarts it), so the same seed, prompt and model give the same text, with or without
the cache. The context is the last ``block_size`` tokens: while the text fits, each new token runs
against the cache; past it, the window slides and is recomputed (positions are absolute).
``on_text(index, piece)`` receives each new piece of a prompt's text as it is written; text that
might still turn out to start a stop string (or an incomplete UTF-8 character) is held back.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass

import torch

from app.jobs.errors import UserError
from worker.ml.text_codecs import BOS_ID, DOCUMENT_SEPARATOR, EOS_ID, PAD_ID, encode_source


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: temperature 0 is greedy; top_k and top_p narrow the draw."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    beam_size: int = 1


def choose(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    """The next token id from one position's logits."""
    logits = logits.double()
    if sampling.temperature == 0:
        return int(logits.argmax())
    logits = logits / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < logits.numel():
        kth = torch.topk(logits, sampling.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probabilities = torch.softmax(logits, dim=-1)
    if sampling.top_p is not None and sampling.top_p < 1.0:
        ordered, order = probabilities.sort(descending=True)
        # Keep the likeliest tokens until their mass reaches top_p (the first is always kept).
        drop = ordered.cumsum(0) - ordered >= sampling.top_p
        probabilities = probabilities.scatter(0, order, ordered.masked_fill(drop, 0.0))
    cumulative = probabilities.cumsum(0)
    draw = torch.rand((), generator=generator, dtype=torch.float64) * cumulative[-1]
    return int(min(torch.searchsorted(cumulative, draw, right=True).item(), logits.numel() - 1))


def _held_back(text: str, stop: tuple[str, ...]) -> int:
    """How many characters at the end of ``text`` may still become part of a stop string."""
    hold = 1 if text.endswith("\ufffd") else 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                hold = max(hold, n)
                break
    return hold


@torch.no_grad()
def generate_one(model, codec, prompt: str, sampling: Sampling, seed: int, *, device: torch.device,
                 use_cache: bool = True, on_piece: Callable[[str], None] | None = None) -> dict:
    """The continuation of ``prompt``: its text, token count and why it ended ("stop" or "length")."""
    context = codec.encode(prompt) or codec.encode(DOCUMENT_SEPARATOR)
    block = model.block_size
    generator = torch.Generator().manual_seed(seed)
    cache = model.new_cache() if use_cache else None
    new: list[int] = []
    text, sent, reason = "", 0, "length"
    for _ in range(sampling.max_new_tokens):
        if cache is not None and len(context) <= block:
            pending = context[cache.length:]
            logits = model.step(torch.tensor([pending], device=device), cache)[0, -1]
        else:
            cache = None  # past the context: slide the window and recompute it
            logits = model(torch.tensor([context[-block:]], device=device))[0, -1]
        token = choose(logits.float().cpu(), sampling, generator)
        context.append(token)
        new.append(token)
        text = codec.decode(new)
        cut = min((i for i in (text.find(s) for s in sampling.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, reason = text[:cut], "stop"
            break
        ready = len(text) - _held_back(text, sampling.stop)
        if on_piece is not None and ready > sent:
            on_piece(text[sent:ready])
            sent = ready
    if on_piece is not None and len(text) > sent:
        on_piece(text[sent:])
    return {"text": text, "tokens": len(new), "finish_reason": reason}


@torch.no_grad()
def greedy_targets(model, source: torch.Tensor) -> torch.Tensor:
    """Greedy seq2seq outputs for a batch of source ids, laid out like the training targets (end id, then padding)."""
    memory, padding = model.encode(source)
    batch = source.shape[0]
    decoded = torch.full((batch, 1), BOS_ID, dtype=torch.long, device=source.device)
    done = torch.zeros(batch, dtype=torch.bool, device=source.device)
    for _ in range(model.target_tokens):
        token = model.decode(decoded, memory, padding)[:, -1].argmax(dim=-1)
        token = token.masked_fill(done, PAD_ID)
        decoded = torch.cat([decoded, token[:, None]], dim=1)
        done |= token == EOS_ID
        if bool(done.all()):
            break
    out = torch.full((batch, model.target_tokens), PAD_ID, dtype=torch.long, device=source.device)
    steps = decoded.shape[1] - 1
    out[:, :steps] = decoded[:, 1:]
    return out


@torch.no_grad()
def beam_search(model, source: torch.Tensor, beam_size: int, max_tokens: int) -> list[int]:
    """The likeliest target ids (without the end id) for one source row, by length-normalised beam search."""
    memory, padding = model.encode(source[None])
    beams: list[tuple[float, list[int]]] = [(0.0, [BOS_ID])]
    finished: list[tuple[float, list[int]]] = []
    for _ in range(max_tokens):
        ids = torch.tensor([b[1] for b in beams], device=source.device)
        logp = torch.log_softmax(model.decode(ids, memory.expand(len(beams), -1, -1),
                                              padding.expand(len(beams), -1))[:, -1].double(), dim=-1)
        candidates = []
        for (score, seq), row in zip(beams, logp.cpu()):
            values, tokens = row.topk(beam_size)
            candidates += [(score + float(v), seq + [int(t)]) for v, t in zip(values, tokens)]
        candidates.sort(key=lambda c: -c[0])
        beams = []
        for score, seq in candidates:
            (finished if seq[-1] == EOS_ID else beams).append((score, seq))
            if len(beams) == beam_size:
                break
        if len(finished) >= beam_size or not beams:
            break
    pool = finished or beams
    best = max(pool, key=lambda c: c[0] / (len(c[1]) - 1))
    return [t for t in best[1][1:] if t != EOS_ID]


def generate(loaded, prompts: list, sampling: Sampling, *, on_text: Callable[[int, str], None] | None = None,
             use_cache: bool = True) -> dict:
    """Generations for every prompt of a text generator: ``{"generations": [...], "seed": ...}``."""
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise UserError(f"inputs[{i}] must be a text string; this model writes text")
    model, codec, device = loaded.network, loaded.tokenizer, loaded.device
    if loaded.signature["task"] == "sequence_to_sequence":
        if sampling.stop or sampling.temperature != 1.0 or sampling.top_k or sampling.top_p or sampling.seed is not None:
            raise UserError("a seq2seq model decodes greedily or by beam search (beam_size); "
                            "temperature, top_k, top_p, seed and stop apply to causal_lm models")
        out = []
        for i, source in enumerate(prompts):
            ids = torch.tensor(encode_source(codec, source, model.source_tokens), device=device)
            limit = min(sampling.max_new_tokens, model.target_tokens)
            if sampling.beam_size > 1:
                tokens = beam_search(model, ids, sampling.beam_size, limit)
            else:
                row = greedy_targets(model, ids[None])[0, :limit].tolist()
                tokens = row[:row.index(EOS_ID)] if EOS_ID in row else row
                tokens = [t for t in tokens if t != PAD_ID]
            text = codec.decode(tokens)
            if on_text is not None:
                on_text(i, text)
            out.append({"text": text, "tokens": len(tokens)})
        return {"generations": out}
    if sampling.beam_size != 1:
        raise UserError("beam_size applies to seq2seq models; a causal_lm samples (temperature 0 is greedy)")
    seed = sampling.seed if sampling.seed is not None else secrets.randbelow(2**31)
    out = []
    for i, prompt in enumerate(prompts):
        piece = (lambda text, i=i: on_text(i, text)) if on_text is not None else None
        result = generate_one(model, codec, prompt, sampling, seed, device=device, use_cache=use_cache,
                              on_piece=piece)
        out.append({"prompt": prompt, **result})
    return {"generations": out, "seed": seed}
