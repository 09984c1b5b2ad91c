"""The `mlp` kind's module: the seed's MLP, and the fused form the `Predictor` runs.

Embeddings of the layer and of every expert id (row 0 = padding, shared by the secondary and every
history entry), concatenated with the gate weights and position (and, with features.token, the
token's embedding), then Linear-BatchNorm-LeakyReLU-Dropout blocks. Input width 239 for emb 5/7 and
32 layers, as the seed's.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from routecast.config.params import TrainParams
from routecast.data.batches import sample_inputs, targets
from routecast.data.features import Features
from routecast.fit.training import EpochCallback, SampleBatches, TrainResult, pick_device, train_neural
from routecast.predictors.horizons import at_horizon, pick_head
from routecast.predictors.mlp import MLPParams
from routecast.predictors.neural import ModelConfig, hidden_blocks, neural_config, token_vocab
from routecast.predictors.tokens import TokenEmbedding, token_rows


class MLP(nn.Module):
    """The seed's MLP (and, with a lookup table, `lookup_mlp`)."""

    def __init__(self, config: ModelConfig, extra_inputs: int = 0) -> None:
        super().__init__()
        self.config = config
        width = config.input_width + extra_inputs  # the features, and what a subclass adds to them
        self.sees_primary = config.sees_primary  # plain attributes for TorchScript
        self.heads, self.horizon_head = config.heads, 0  # one head per horizon; the call returns horizon_head's
        self.register_buffer("slot", torch.arange(config.history_len).unsqueeze(0), persistent=False)
        self.layer_emb = nn.Embedding(config.num_layers, config.layer_emb)
        self.expert_emb = nn.Embedding(config.num_experts + 1, config.expert_emb, padding_idx=0)
        last = config.architecture[-1] if config.architecture else width
        self.mlp = nn.Sequential(*hidden_blocks(width, config.architecture, config.dropout),
                                 nn.Linear(last, config.num_experts * config.heads))
        self.token = TokenEmbedding(config.vocab_size, config.token_emb)  # width 0 without features.token

    def features(self, layer: torch.Tensor, primary: torch.Tensor, secondary: torch.Tensor, history: torch.Tensor,
                 gating: torch.Tensor, position: torch.Tensor, prev: torch.Tensor, extra: torch.Tensor,
                 token: torch.Tensor) -> torch.Tensor:
        history = history * (self.slot <= layer.unsqueeze(1))  # causal by construction: nothing past layer l
        ids = [secondary.unsqueeze(1), history, prev]
        if not self.sees_primary:
            ids.append(primary.unsqueeze(1) + 1)
        # One lookup for every expert id (adjacent in the input): one gather and one gradient scatter.
        experts = self.expert_emb(torch.cat(ids, dim=1)).flatten(1)
        return torch.cat([self.layer_emb(layer), experts, gating, position.unsqueeze(1), extra, self.token(token)],
                         dim=1)

    def forward(self, layer: torch.Tensor, primary: torch.Tensor, secondary: torch.Tensor, history: torch.Tensor,
                gating: torch.Tensor, position: torch.Tensor, prev: torch.Tensor, extra: torch.Tensor,
                token: torch.Tensor) -> torch.Tensor:
        out = self.mlp(self.features(layer, primary, secondary, history, gating, position, prev, extra, token))
        return pick_head(out, self.heads, self.horizon_head)

    def at_horizon(self, d: int) -> nn.Module:
        return at_horizon(self, d)


class FusedMLP(nn.Module):
    """The eval-mode `mlp` kind as embedding_bag + (Linear with BatchNorm folded) + LeakyReLU: the
    same call and logits as `MLP`."""

    def __init__(self, model: MLP) -> None:
        super().__init__()
        c = model.config
        L, E, H, k, X, P, T = c.num_layers, c.num_experts, c.history_len, c.top_k, c.num_extra, c.num_prev, c.token_emb
        self.sees_primary = c.sees_primary
        self.heads, self.horizon_head = model.heads, model.horizon_head
        linears = [m for m in model.mlp if isinstance(m, nn.Linear)]
        norms = [m for m in model.mlp if isinstance(m, nn.BatchNorm1d)]
        slopes = {m.negative_slope for m in model.mlp if isinstance(m, nn.LeakyReLU)}
        assert len(linears) == len(norms) + 1 and len(slopes) <= 1
        self.negative_slope = float(slopes.pop()) if slopes else 0.01
        ids = 1 + H + P + (0 if c.sees_primary else 1)  # secondary, history, prev, [primary]: as MLP.features
        with torch.no_grad():
            folded = [_fold(lin, bn) for lin, bn in zip(linears, norms)] + [
                (linears[-1].weight.double(), linears[-1].bias.double())]
            w1, b1 = folded[0]
            layer_emb, expert_emb = model.layer_emb.weight.double(), model.expert_emb.weight.double()
            blocks = torch.split(w1, [c.layer_emb] + [c.expert_emb] * ids + [k, 1, X, T], dim=1)
            rows = [layer_emb @ blocks[0].T] + [expert_emb @ blocks[1 + j].T for j in range(ids)]  # [L|E+1, U]
            rows.append(model.token.emb.weight.double() @ blocks[-1].T)  # [vocab + 1, U] (zeros without the token)
            dense = torch.cat(blocks[1 + ids:-1], dim=1).T  # gating, position, extra
        self.register_buffer("table", torch.cat(rows).float())
        self.register_buffer("vocab", model.token.vocab.clone())
        self.token_offset = L + ids * (E + 1)  # the token rows' first row in `table`
        self.register_buffer("dense_weight", dense.float().contiguous())
        self.register_buffer("bias", b1.float())
        self.register_buffer("offsets", (L + torch.arange(ids) * (E + 1)).unsqueeze(0))  # each id block's rows
        self.hidden = nn.ModuleList()
        for w, b in folded[1:]:
            lin = nn.Linear(w.shape[1], w.shape[0])
            lin.weight.data, lin.bias.data = w.float().contiguous(), b.float()
            lin.requires_grad_(False)
            self.hidden.append(lin)

    def forward(self, layer: torch.Tensor, primary: torch.Tensor, secondary: torch.Tensor, history: torch.Tensor,
                gating: torch.Tensor, position: torch.Tensor, prev: torch.Tensor, extra: torch.Tensor,
                token: torch.Tensor) -> torch.Tensor:
        ids = [secondary.unsqueeze(1), history, prev]
        if not self.sees_primary:
            ids.append(primary.unsqueeze(1) + 1)
        token_row = token_rows(self.vocab, token).unsqueeze(1) + self.token_offset
        index = torch.cat([layer.unsqueeze(1), torch.cat(ids, 1) + self.offsets, token_row], 1)
        dense = torch.cat([gating, position.unsqueeze(1), extra], 1)
        x = torch.addmm(self.bias, dense, self.dense_weight) + F.embedding_bag(index, self.table, mode="sum")
        for lin in self.hidden:
            x = lin(F.leaky_relu(x, self.negative_slope))
        return pick_head(x, self.heads, self.horizon_head)


def _fold(linear: nn.Linear, norm: nn.BatchNorm1d) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear followed by eval-mode BatchNorm as one Linear (float64 while folding)."""
    scale = norm.weight.double() / torch.sqrt(norm.running_var.double() + norm.eps)
    weight = linear.weight.double() * scale[:, None]
    bias = (linear.bias.double() - norm.running_mean.double()) * scale + norm.bias.double()
    return weight, bias


def fit(params: MLPParams, train: TrainParams, fit_split: Features, val: Features, epochs: int,
        on_epoch: EpochCallback | None, desc: str) -> TrainResult:
    """Train the `mlp` kind (`routecast.fit.training.train_neural`)."""
    config = neural_config("mlp", fit_split, layer_emb=params.layer_emb, expert_emb=params.expert_emb,
                           architecture=tuple(params.architecture), dropout=params.dropout)
    model = MLP(config)
    model.token.set_vocab(token_vocab(fit_split))
    inputs = sample_inputs(fit_split, use_prev=config.num_prev > 0, use_extra=config.num_extra > 0,
                           use_token=config.token_emb > 0)
    batches = SampleBatches(inputs, targets(fit_split, train.target, every_horizon=True), train.batch_size,
                            pick_device(train.device))
    return train_neural(model, batches, params.lr, train, val, epochs, on_epoch, desc)


def load(config: dict) -> MLP:
    return MLP(ModelConfig(**{**config, "kind": "mlp"}))


def serve(module: MLP) -> FusedMLP:
    return FusedMLP(module).eval()
