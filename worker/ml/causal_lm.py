"""``causal_lm``: a decoder-only, pre-norm transformer language model with a key/value cache.

Positions are a learned table or rotary (RoPE); the output layer shares the token embedding when
``tie_weights`` is set. ``forward`` gives next-token logits at every position (training); ``step``
runs new tokens against a :class:`KVCache` of the earlier ones (generation).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from app.jobs.schemas import CausalLMConfig


@dataclass
class KVCache:
    """Keys and values of the tokens seen so far, per layer (batch, heads, tokens, head width)."""

    keys: list[torch.Tensor | None] = field(default_factory=list)
    values: list[torch.Tensor | None] = field(default_factory=list)

    @property
    def length(self) -> int:
        """Tokens held."""
        return 0 if not self.keys or self.keys[0] is None else self.keys[0].shape[2]


def _rotate(x: torch.Tensor, start: int) -> torch.Tensor:
    """RoPE on (batch, heads, tokens, width): pairs of channels turned by position-dependent angles."""
    width = x.shape[-1]
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, width, 2, device=x.device, dtype=torch.float32) / width))
    positions = torch.arange(start, start + x.shape[2], device=x.device, dtype=torch.float32)
    angles = positions[:, None] * inv_freq[None, :]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where a token sees itself and the tokens before it."""

    def __init__(self, config: CausalLMConfig):
        super().__init__()
        self.heads, self.width = config.nhead, config.d_model
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)
        self.dropout = config.dropout
        self.rotary = config.positional == "rotary"

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        """Attention output for ``x`` (batch, tokens, width), appending its keys and values to ``cache``."""
        batch, tokens, _ = x.shape
        q, k, v = (t.view(batch, tokens, self.heads, -1).transpose(1, 2) for t in self.qkv(x).split(self.width, dim=2))
        start = cache.length if cache is not None else 0
        if self.rotary:
            q, k = _rotate(q, start), _rotate(k, start)
        if cache is not None:
            if cache.keys[layer] is not None:
                k = torch.cat([cache.keys[layer], k], dim=2)
                v = torch.cat([cache.values[layer], v], dim=2)
            cache.keys[layer], cache.values[layer] = k, v
        total = k.shape[2]
        # Query i sits at position start + i and sees keys 0..start + i.
        mask = torch.ones(tokens, total, dtype=torch.bool, device=x.device).tril(diagonal=total - tokens)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, self.width))


class Block(nn.Module):
    """Pre-norm transformer block: attention then a GELU feed-forward, each around a residual."""

    def __init__(self, config: CausalLMConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.d_model)
        self.attention = CausalSelfAttention(config)
        self.norm2 = nn.LayerNorm(config.d_model)
        self.feed_forward = nn.Sequential(nn.Linear(config.d_model, config.dim_feedforward), nn.GELU(),
                                          nn.Linear(config.dim_feedforward, config.d_model), nn.Dropout(config.dropout))
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None, layer: int) -> torch.Tensor:
        """The block's output for ``x``."""
        x = x + self.dropout(self.attention(self.norm1(x), cache, layer))
        return x + self.feed_forward(self.norm2(x))


class CausalLM(nn.Module):
    """Token embedding (+ learned positions), pre-norm blocks, a final norm and the vocabulary head."""

    def __init__(self, config: CausalLMConfig, vocab_size: int):
        super().__init__()
        if config.positional == "rotary" and (config.d_model // config.nhead) % 2:
            raise ValueError("rotary positions need an even head width (d_model / nhead)")
        self.block_size = config.block_size
        self.embedding = nn.Embedding(vocab_size, config.d_model)
        self.positions = (nn.Parameter(torch.zeros(config.block_size, config.d_model))
                          if config.positional == "learned" else None)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, vocab_size, bias=False)
        self.apply(_init)
        if self.positions is not None:
            nn.init.normal_(self.positions, std=0.02)
        if config.tie_weights:
            self.head.weight = self.embedding.weight

    def new_cache(self) -> KVCache:
        """An empty key/value cache for :meth:`step`."""
        return KVCache([None] * len(self.blocks), [None] * len(self.blocks))

    def _run(self, ids: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        start = cache.length if cache is not None else 0
        if start + ids.shape[1] > self.block_size:
            raise ValueError(f"{start + ids.shape[1]} tokens exceed the context of {self.block_size}")
        x = self.embedding(ids)
        if self.positions is not None:
            x = x + self.positions[start:start + ids.shape[1]].to(x.dtype)
        x = self.dropout(x)
        for layer, block in enumerate(self.blocks):
            x = block(x, cache, layer)
        return self.head(self.norm(x))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Next-token logits (batch, tokens, vocabulary) for every position of ``ids``."""
        return self._run(ids, None)

    def step(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits for ``ids`` that follow the tokens in ``cache`` (which then holds them too)."""
        return self._run(ids, cache)


def _init(module: nn.Module) -> None:
    # GPT-2's initialisation: small normal weights, zero biases.
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
