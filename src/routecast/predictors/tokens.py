"""The token as an input of the learned kinds (`features.token`).

A token's key is its vocabulary id, or a stable hash of its text (`routecast.data.features.text_keys`).
A kind learns an embedding of the keys seen at least `min_count` times in its training data (its
vocabulary, kept in the module as a sorted buffer, so a checkpoint or an export carries it); every
other key, and a sample without a token (key -1), reads row 0, the unseen-token row.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from routecast.data.features import Features

TOKEN_EMB = 16  # width of the token embedding of the mlp, lookup_mlp and gru kinds
TOKEN_MIN_COUNT = 2  # their vocabulary: the tokens seen at least this often in the fit split


def build_vocab(feats: Features, min_count: int) -> np.ndarray:
    """The token keys seen at least `min_count` times among `feats`' tokens (sorted); empty without tokens."""
    if feats.token is None:
        return np.zeros(0, dtype=np.int64)
    first = feats.layer == feats.layer.min() if len(feats) else np.zeros(0, dtype=bool)
    keys, counts = np.unique(feats.token[first], return_counts=True)
    return keys[counts >= min_count].astype(np.int64)


def token_rows(vocab: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Embedding row of each token key: 1 + its place in the sorted `vocab`, 0 if not in it."""
    if vocab.numel() == 0:
        return torch.zeros_like(key)
    at = torch.searchsorted(vocab, key).clamp(max=vocab.numel() - 1)
    return torch.where(vocab[at] == key, at + 1, 0)


class TokenEmbedding(nn.Module):
    """key [N] (int64; -1: no token) -> embedding [N, dim]; dim 0 when the kind does not read the token."""

    def __init__(self, vocab_size: int, dim: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab_size + 1, dim)  # row 0: unseen (or no token)
        self.register_buffer("vocab", torch.zeros(vocab_size, dtype=torch.long))

    def set_vocab(self, vocab: np.ndarray) -> None:
        self.vocab.copy_(torch.from_numpy(vocab))

    def rows(self, key: torch.Tensor) -> torch.Tensor:
        return token_rows(self.vocab, key)

    def forward(self, key: torch.Tensor) -> torch.Tensor:
        return self.emb(self.rows(key))
