"""The `gru` kind's module: a GRU over the token's path through the layers.

It reads the path layer by layer (an embedding of the pair (layer j, primary expert at j)), and at
layer l a per-layer linear head reads the GRU state with the layer's secondary, gate weights,
position (and the optional features: the previous token's experts, spec_logits, the token). One
token is one training sequence (`forward_tokens`).
"""

from __future__ import annotations

import torch
from torch import nn

from routecast.config.params import TrainParams
from routecast.data.batches import sample_inputs, targets
from routecast.data.features import Features
from routecast.fit.training import EpochCallback, TokenBatches, TrainResult, pick_device, train_neural
from routecast.predictors.gru import GRUParams
from routecast.predictors.horizons import at_horizon, pick_head
from routecast.predictors.neural import ModelConfig, neural_config, token_vocab
from routecast.predictors.tokens import TokenEmbedding


class GRUPredictor(nn.Module):
    """A GRU over the token's layers; a head at layer l predicts layer l + lookahead."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        L, E = config.num_layers, config.num_experts
        self.slots, self.num_experts, self.lookahead = config.slots, E, config.lookahead  # for TorchScript
        self.sees_primary = config.sees_primary
        self.heads, self.horizon_head = config.heads, 0  # one head per horizon; the call returns horizon_head's
        # (layer j, expert + 1) pairs: layer-specific expert embeddings, index j * (E + 1) + id.
        self.step_emb = nn.Embedding(L * (E + 1), config.expert_emb)
        self.head_emb = nn.Embedding(L * (E + 1), config.expert_emb)  # secondary, primary, prev at their layers
        self.drop = nn.Dropout(config.dropout)
        self.rnn = nn.GRU(config.expert_emb, config.hidden, num_layers=config.rnn_layers, batch_first=True,
                          dropout=config.dropout if config.rnn_layers > 1 else 0.0)
        ids = 1 + config.num_prev + (0 if config.sees_primary else 1)  # secondary, prev, primary
        width = config.hidden + config.expert_emb * ids + config.top_k + 1 + config.num_extra + config.token_emb
        # Per-layer output projection: each layer maps the state (and layer l's other features) to the
        # next layer's experts (at every horizon) with its own weights, side by side in one matrix.
        self.out = nn.Linear(width, config.slots * config.heads * E)
        self.token = TokenEmbedding(config.vocab_size, config.token_emb)  # width 0 without features.token

    def path_states(self, history: torch.Tensor) -> torch.Tensor:
        """GRU state after each layer 0..slots-1 of the path `history` (+1 ids; 0 = unknown; layers past
        history_len read as unknown, the head gets layer l's primary then): [B, S, hidden]."""
        B, H = history.shape[0], history.shape[1]
        steps = torch.zeros((B, self.slots), dtype=torch.long, device=history.device)
        n = min(H, self.slots)
        steps[:, :n] = history[:, :n]
        index = steps + torch.arange(self.slots, device=history.device) * (self.num_experts + 1)
        states, _ = self.rnn(self.drop(self.step_emb(index)))
        return states

    def head(self, state: torch.Tensor, layer: torch.Tensor, primary: torch.Tensor, secondary: torch.Tensor,
             gating: torch.Tensor, position: torch.Tensor, prev: torch.Tensor, extra: torch.Tensor,
             token: torch.Tensor) -> torch.Tensor:
        base = layer.unsqueeze(1) * (self.num_experts + 1)
        # prev: the previous token's experts at the target layer
        ids = [base + secondary.unsqueeze(1), base + self.lookahead * (self.num_experts + 1) + prev]
        if not self.sees_primary:
            ids.append(base + primary.unsqueeze(1) + 1)
        x = torch.cat([state, self.head_emb(torch.cat(ids, 1)).flatten(1), gating, position.unsqueeze(1), extra,
                       self.token(token)], 1)
        every_layer = self.out(self.drop(x)).view(x.shape[0], self.slots, self.heads * self.num_experts)
        return pick_head(every_layer[torch.arange(x.shape[0], device=x.device), layer], self.heads, self.horizon_head)

    def forward_tokens(self, history: torch.Tensor, token: torch.Tensor, layer: torch.Tensor, primary: torch.Tensor,
                       secondary: torch.Tensor, gating: torch.Tensor, position: torch.Tensor, prev: torch.Tensor,
                       extra: torch.Tensor, token_key: torch.Tensor) -> torch.Tensor:
        """Logits for samples (token[i], layer[i]) of the tokens whose paths are `history` [B, H]:
        every path is read once, however many of its layers are asked for. A sample's own history
        is a prefix of its token's, and the GRU is causal, so this equals `forward` per sample."""
        state = self.path_states(history)[token, layer]
        return self.head(state, layer, primary, secondary, gating, position, prev, extra, token_key)

    def forward(self, layer: torch.Tensor, primary: torch.Tensor, secondary: torch.Tensor, history: torch.Tensor,
                gating: torch.Tensor, position: torch.Tensor, prev: torch.Tensor, extra: torch.Tensor,
                token: torch.Tensor) -> torch.Tensor:
        path = torch.arange(layer.shape[0], device=layer.device)
        return self.forward_tokens(history, path, layer, primary, secondary, gating, position, prev, extra, token)

    def at_horizon(self, d: int) -> nn.Module:
        return at_horizon(self, d)


def fit(params: GRUParams, train: TrainParams, fit_split: Features, val: Features, epochs: int,
        on_epoch: EpochCallback | None, desc: str) -> TrainResult:
    """Train the `gru` kind on batches of whole tokens (every layer of a token in one pass)."""
    config = neural_config("gru", fit_split, expert_emb=params.emb, dropout=params.dropout, hidden=params.hidden,
                           rnn_layers=params.layers)
    model = GRUPredictor(config)
    model.token.set_vocab(token_vocab(fit_split))
    inputs = sample_inputs(fit_split, use_prev=config.num_prev > 0, use_extra=config.num_extra > 0,
                           use_token=config.token_emb > 0)
    batches = TokenBatches(fit_split, inputs, targets(fit_split, train.target, every_horizon=True), params.batch_tokens,
                           pick_device(train.device))
    return train_neural(model, batches, params.lr, train, val, epochs, on_epoch, desc)


def load(config: dict) -> GRUPredictor:
    return GRUPredictor(ModelConfig(**{**config, "kind": "gru"}))
