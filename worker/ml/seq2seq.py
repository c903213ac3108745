"""``seq2seq``: an encoder-decoder transformer (pre-norm, learned positions, one shared vocabulary).

Training input is one row per pair: ``max_source_tokens`` source ids, then ``max_target_tokens``
decoder inputs (start id, then the target shifted right: teacher forcing). ``forward`` gives the
logits of every target position. Decoding (greedy or beam search) lives in ``worker.ml.generation``.
"""

from __future__ import annotations

import torch
from torch import nn

from app.jobs.schemas import Seq2SeqConfig
from worker.ml.text_codecs import PAD_ID


class Seq2Seq(nn.Module):
    """Shared token embedding, encoder and decoder stacks, and the vocabulary head."""

    def __init__(self, config: Seq2SeqConfig, vocab_size: int):
        super().__init__()
        d = config.d_model
        self.source_tokens, self.target_tokens = config.max_source_tokens, config.max_target_tokens
        self.embedding = nn.Embedding(vocab_size, d, padding_idx=PAD_ID)
        self.source_positions = nn.Parameter(torch.randn(config.max_source_tokens, d) * 0.02)
        self.target_positions = nn.Parameter(torch.randn(config.max_target_tokens, d) * 0.02)
        encoder = nn.TransformerEncoderLayer(d, config.nhead, config.dim_feedforward, config.dropout,
                                             batch_first=True, norm_first=True)
        decoder = nn.TransformerDecoderLayer(d, config.nhead, config.dim_feedforward, config.dropout,
                                             batch_first=True, norm_first=True)
        # No nested-tensor fast path: identical numerics in training and evaluation.
        self.encoder = nn.TransformerEncoder(encoder, config.num_encoder_layers, norm=nn.LayerNorm(d),
                                             enable_nested_tensor=False)
        self.decoder = nn.TransformerDecoder(decoder, config.num_decoder_layers, norm=nn.LayerNorm(d))
        self.head = nn.Linear(d, vocab_size)

    def encode(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder states of source ids (batch, source tokens), and the mask of their padding."""
        padding = source == PAD_ID
        x = self.embedding(source) + self.source_positions[:source.shape[1]]
        return self.encoder(x, src_key_padding_mask=padding), padding

    def decode(self, target: torch.Tensor, memory: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        """Logits (batch, target tokens, vocabulary) for decoder inputs ``target`` over encoder states."""
        length = target.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=target.device).triu(diagonal=1)
        x = self.embedding(target) + self.target_positions[:length]
        out = self.decoder(x, memory, tgt_mask=causal, tgt_key_padding_mask=target == PAD_ID,
                           memory_key_padding_mask=padding)
        return self.head(out)

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits of the target positions of ``pairs`` (source ids, then decoder inputs)."""
        memory, padding = self.encode(pairs[:, :self.source_tokens])
        return self.decode(pairs[:, self.source_tokens:], memory, padding)
