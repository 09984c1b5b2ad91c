"""The `lookup_mlp` kind's module: the MLP given the lookup ladder's log-probabilities as inputs and
added to its output, its last Linear starting at zero, so it starts exactly at the three-deep lookup
table and learns a correction (small data cannot leave it below the table)."""

from __future__ import annotations

import torch
from torch import nn

from routecast.config.params import TrainParams
from routecast.data.batches import Inputs, sample_inputs, targets
from routecast.data.features import Features
from routecast.fit.training import EpochCallback, SampleBatches, TrainResult, pick_device, train_neural
from routecast.predictors.horizons import pick_head
from routecast.predictors.mlp import MLPParams
from routecast.predictors.mlp.model import MLP
from routecast.predictors.neural import ModelConfig, neural_config, token_vocab
from routecast.predictors.references import cross_fitted_lookup_scores, lookup_tables

# The reference ladder's (routecast.predictors.references), so lookup_mlp starts at that table.
LOOKUP_PSEUDO_COUNT = 1e-3


class LookupMLP(MLP):
    """logits = scale * log P_lookup + MLP(features, log P_lookup): starts at the table (scale 1,
    zero last Linear). The table's smoothed probabilities are sharp (a context seen a few times
    puts almost nothing on unseen experts), so `scale` learns how far to trust them.

    The ladder (layer, e) -> (layer, e-1, e) -> (layer, e-2, e-1, e) lives in buffers: per order, the
    sorted context keys seen in training and their target counts; an unseen key backs off to the
    shorter context, as `routecast.predictors.references.LookupPredictor` (which fits the same counts)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config, extra_inputs=config.num_experts)  # the table's log-probabilities
        last = self.mlp[-1]
        assert isinstance(last, nn.Linear)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.scale = nn.Parameter(torch.ones(()))
        self.num_experts = config.num_experts
        self.pseudo_count = LOOKUP_PSEUDO_COUNT
        self.register_buffer("frequency", torch.full((config.num_layers, config.num_experts), 1.0 / config.num_experts))
        for order in (1, 2, 3):
            self.register_buffer(f"keys_{order}", torch.zeros(0, dtype=torch.long))
            self.register_buffer(f"counts_{order}", torch.zeros(0, config.num_experts))

    def set_tables(self, frequency: torch.Tensor, keys: list[torch.Tensor], counts: list[torch.Tensor]) -> None:
        """Load fitted ladder counts (see `routecast.predictors.references.lookup_tables`)."""
        self.frequency = frequency.float()
        self.keys_1, self.keys_2, self.keys_3 = (k.long() for k in keys)
        self.counts_1, self.counts_2, self.counts_3 = (c.float() for c in counts)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        # The tables' sizes are the fitted ones: take them from the checkpoint.
        for order in (1, 2, 3):
            for name in (f"keys_{order}", f"counts_{order}"):
                if prefix + name in state_dict:
                    setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def table_logp(self, layer: torch.Tensor, primary: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        """log P_lookup(target | layer, e-2, e-1, e) for a batch: [N, E]."""
        probs = self.frequency[layer]
        probs = self._back_off(probs, self.keys_1, self.counts_1, _context_key(layer, history, primary, 1,
                                                                                self.num_experts))
        probs = self._back_off(probs, self.keys_2, self.counts_2, _context_key(layer, history, primary, 2,
                                                                                self.num_experts))
        probs = self._back_off(probs, self.keys_3, self.counts_3, _context_key(layer, history, primary, 3,
                                                                                self.num_experts))
        return torch.log(probs.clamp_min(1e-12))

    def _back_off(self, probs: torch.Tensor, keys: torch.Tensor, counts: torch.Tensor,
                  key: torch.Tensor) -> torch.Tensor:
        """A seen key's counts pulled towards `probs` (the shorter context) by the pseudo-count."""
        if keys.numel() == 0:
            return probs
        pos = torch.searchsorted(keys, key).clamp(max=keys.numel() - 1)
        row = torch.where((keys[pos] == key).unsqueeze(1), counts[pos], torch.zeros_like(probs))
        return (row + self.pseudo_count * probs) / (row.sum(1, keepdim=True) + self.pseudo_count)

    def forward_with_table(self, table: torch.Tensor, layer: torch.Tensor, primary: torch.Tensor,
                           secondary: torch.Tensor, history: torch.Tensor, gating: torch.Tensor,
                           position: torch.Tensor, prev: torch.Tensor, extra: torch.Tensor,
                           token: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.features(layer, primary, secondary, history, gating, position, prev, extra, token), table],
                      1)
        out = self.mlp(x)
        if self.heads > 1:  # the table (of the main horizon) starts the main head only
            out = torch.cat([self.scale * table + out[:, :self.num_experts], out[:, self.num_experts:]], 1)
        else:
            out = self.scale * table + out
        return pick_head(out, self.heads, self.horizon_head)

    def forward(self, layer: torch.Tensor, primary: torch.Tensor, secondary: torch.Tensor, history: torch.Tensor,
                gating: torch.Tensor, position: torch.Tensor, prev: torch.Tensor, extra: torch.Tensor,
                token: torch.Tensor) -> torch.Tensor:
        table = self.table_logp(layer, primary, history)
        return self.forward_with_table(table, layer, primary, secondary, history, gating, position, prev, extra,
                                       token)


def _context_key(layer: torch.Tensor, history: torch.Tensor, primary: torch.Tensor, order: int,
                 num_experts: int) -> torch.Tensor:
    """(layer, e_{l-order+1}+1, ..., e_l+1) as one int64, as `routecast.predictors.references.context_keys`."""
    base = num_experts + 1
    H = history.shape[1]
    key = layer
    for offset in range(order - 1, -1, -1):
        if offset == 0:
            expert = primary + 1
        else:
            at = layer - offset
            inside = (at >= 0) & (at < H)
            expert = torch.gather(history, 1, at.clamp(0, H - 1).unsqueeze(1)).squeeze(1) * inside
        key = key * base + expert
    return key


def fit(params: MLPParams, train: TrainParams, fit_split: Features, val: Features, epochs: int,
        on_epoch: EpochCallback | None, desc: str) -> TrainResult:
    """Train the `lookup_mlp` kind: the ladder fitted on the fit_split split goes into the module's buffers,
    and each training sample sees the table's log-probabilities from tables fitted without its own
    sequence (5 folds), so the correction learns how the table errs on unseen sequences. Epoch 0 is
    the table itself (with one horizon; with more, the table starts the main horizon's head)."""
    config = neural_config("lookup_mlp", fit_split, layer_emb=params.layer_emb, expert_emb=params.expert_emb,
                           architecture=tuple(params.architecture), dropout=params.dropout)
    model = LookupMLP(config)
    model.set_tables(*lookup_tables(fit_split, train.target))
    model.token.set_vocab(token_vocab(fit_split))
    table = torch.from_numpy(cross_fitted_lookup_scores(fit_split, train.target, seed=train.seed, log=True))
    inputs = sample_inputs(fit_split, use_prev=config.num_prev > 0, use_extra=config.num_extra > 0,
                           use_token=config.token_emb > 0)
    batches = _TableBatches(inputs, targets(fit_split, train.target, every_horizon=True), table, train.batch_size,
                            pick_device(train.device))
    # Epoch 0 (the table) is a predictor of the main horizon only: with more heads it is no candidate.
    return train_neural(model, batches, params.lr, train, val, epochs, on_epoch, desc, score_first=config.heads == 1)


def load(config: dict) -> LookupMLP:
    return LookupMLP(ModelConfig(**{**config, "kind": "lookup_mlp"}))


class _TableBatches(SampleBatches):
    """Sample batches that carry each sample's cross-fitted table log-probabilities."""

    def __init__(self, inputs: Inputs, y: torch.Tensor, table: torch.Tensor, batch_size: int,
                 device: torch.device) -> None:
        super().__init__(inputs, y, batch_size, device)
        self.table = table.to(device)

    def gather(self, idx: torch.Tensor) -> tuple:
        return (*super().gather(idx), self.table[idx])

    def forward(self, model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
        x, y, table = batch
        return model.forward_with_table(table, *x), y
