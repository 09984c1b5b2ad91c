"""What the neural kinds (`mlp`, `lookup_mlp`, `gru`) share: their plain config and the MLP blocks.

Every neural kind maps a batch of samples (the tensors of `routecast.data.batches.Inputs`: layer,
primary, secondary+1, history+1, gating, position, prev+1, extra, token) to logits [N, num_experts] over
the experts of layer l + lookahead, and sees nothing of layer l + 1 or later of the token.
`ModelConfig` is plain data, so a checkpoint is the config plus a state dict.

With several `features.horizons` a kind has one output head per horizon (`routecast.predictors.horizons`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from torch import nn

from routecast.data.features import Features
from routecast.predictors.tokens import TOKEN_EMB, TOKEN_MIN_COUNT, build_vocab


@dataclass(frozen=True)
class ModelConfig:
    kind: str
    num_layers: int
    num_experts: int
    top_k: int
    history_len: int
    lookahead: int = 1
    layer_emb: int = 5
    expert_emb: int = 7
    architecture: tuple[int, ...] = field(default=(512, 512))
    dropout: float = 0.0
    hidden: int = 128  # gru: state width
    rnn_layers: int = 1  # gru: stacked GRU layers
    num_prev: int = 0  # width of the previous-token feature (0: off, else top_k)
    num_extra: int = 0  # width of extra dense features (spec_logits)
    token_emb: int = 0  # width of the token's embedding (0: features.token off)
    vocab_size: int = 0  # tokens with an embedding row of their own (routecast.predictors.tokens)
    horizons: tuple[int, ...] = ()  # one output head per horizon (features.horizons); () reads as (lookahead,)

    def __post_init__(self) -> None:
        object.__setattr__(self, "architecture", tuple(int(u) for u in self.architecture))
        object.__setattr__(self, "horizons", tuple(int(d) for d in self.horizons) or (self.lookahead,))

    @property
    def heads(self) -> int:
        return len(self.horizons)

    @property
    def slots(self) -> int:
        """Source layers with a target: 0 .. num_layers - lookahead - 1."""
        return self.num_layers - self.lookahead

    @property
    def reads_token(self) -> bool:
        return self.token_emb > 0

    @property
    def sees_primary(self) -> bool:
        """The history holds layer l's primary for every l: no separate input needed (the seed's shape)."""
        return self.history_len >= self.slots

    @property
    def input_width(self) -> int:
        """Width of the MLP's concatenated features (the seed's 239 for emb 5/7, 32 layers); a kind may
        add inputs of its own (`lookup_mlp`: the table's log-probabilities)."""
        ids = 1 + self.history_len + self.num_prev + (0 if self.sees_primary else 1)
        return self.layer_emb + self.expert_emb * ids + self.top_k + 1 + self.num_extra + self.token_emb


def hidden_blocks(width: int, architecture: tuple[int, ...], dropout: float) -> list[nn.Module]:
    """Linear-BatchNorm-LeakyReLU(0.1)-Dropout per hidden width."""
    blocks: list[nn.Module] = []
    for units in architecture:
        blocks += [nn.Linear(width, units), nn.BatchNorm1d(units), nn.LeakyReLU(0.1, inplace=True),
                   nn.Dropout(dropout)]
        width = units
    return blocks


def neural_config(kind: str, feats: Features, **knobs: object) -> ModelConfig:
    """The config of a neural kind for samples shaped like `feats` (its optional features switched on
    where `feats` has them: the token's vocabulary is the one `feats` gives, `token_vocab`), with
    the kind's own knobs."""
    m = feats.meta
    num_prev = m.top_k if feats.prev_experts is not None else 0
    num_extra = m.num_experts if feats.spec_logits is not None else 0
    token_emb = TOKEN_EMB if feats.token is not None else 0
    return ModelConfig(kind, m.num_layers, m.num_experts, m.top_k, m.history_len, m.lookahead, num_prev=num_prev,
                       num_extra=num_extra, token_emb=token_emb, vocab_size=len(token_vocab(feats)),
                       horizons=m.horizons, **knobs)


def token_vocab(feats: Features) -> np.ndarray:
    """The vocabulary of the mlp, lookup_mlp and gru kinds: the tokens of `feats` seen at least
    TOKEN_MIN_COUNT times (sorted keys; empty without features.token)."""
    return build_vocab(feats, TOKEN_MIN_COUNT)


def build_model(config: ModelConfig) -> nn.Module:
    """An untrained module of a neural kind from its config (the kind's own `load`)."""
    from routecast.predictors import registry

    return registry.get(config.kind).load(asdict(config))

