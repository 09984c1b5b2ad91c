"""The neural predictors, standing alone (torch only): one config, three kinds.

Every kind maps a batch of samples (the tensors of `routecast.data.batches.Inputs`: layer, primary,
secondary+1, history+1, gating, position, prev+1, extra) to logits [N, num_experts] over the
experts of layer l + lookahead, and sees nothing of layer l + 1 or later of the token:

    mlp         the seed's model: embeddings of the layer and of every expert id (row 0 =
                padding, shared by the secondary and every history entry), concatenated with
                the gate weights and position, then Linear-BatchNorm-LeakyReLU-Dropout blocks.
                Input width 239 for emb 5/7 and 32 layers, as the seed.
    lookup_mlp  the same MLP, given the lookup ladder's smoothed log-probabilities as inputs and
                added to its output (the last Linear starts at zero): it starts exactly at the
                three-deep lookup table and learns a correction, so small data cannot leave it
                below the table. The table is fitted on the training split and kept in buffers.
    gru         reads the token's path layer by layer (an embedding of the pair (layer j, primary
                expert at j)), and at layer l a per-layer linear head reads the GRU state with
                the layer's secondary, gate weights, position (and the optional features). One
                token is one training sequence (`forward_tokens`). `architecture` is not used.

`build_model(config)` makes any kind; `ModelConfig` is plain data, so a checkpoint is the config
plus a state dict. The mixture of Markov chains is fitted by EM in `routecast.predictors.mixture`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

NEURAL_KINDS = ("mlp", "lookup_mlp", "gru")
LOOKUP_PSEUDO_COUNT = 1e-3  # the reference ladder's (routecast.predictors.references), so lookup_mlp starts at that table


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

    def __post_init__(self) -> None:
        if self.kind not in NEURAL_KINDS:
            raise ValueError(f"kind {self.kind!r}: a neural kind is one of {NEURAL_KINDS}")
        object.__setattr__(self, "architecture", tuple(int(u) for u in self.architecture))

    @property
    def slots(self) -> int:
        """Source layers with a target: 0 .. num_layers - lookahead - 1."""
        return self.num_layers - self.lookahead

    @property
    def sees_primary(self) -> bool:
        """The history holds layer l's primary for every l: no separate input needed (the seed's shape)."""
        return self.history_len >= self.slots

    @property
    def input_width(self) -> int:
        """Width of the MLP's concatenated input (the seed's 239 for emb 5/7, 32 layers)."""
        ids = 1 + self.history_len + self.num_prev + (0 if self.sees_primary else 1)
        width = self.layer_emb + self.expert_emb * ids + self.top_k + 1 + self.num_extra
        return width + (self.num_experts if self.kind == "lookup_mlp" else 0)


def hidden_blocks(width: int, architecture: tuple[int, ...], dropout: float) -> list[nn.Module]:
    """Linear-BatchNorm-LeakyReLU(0.1)-Dropout per hidden width."""
    blocks: list[nn.Module] = []
    for units in architecture:
        blocks += [nn.Linear(width, units), nn.BatchNorm1d(units), nn.LeakyReLU(0.1, inplace=True),
                   nn.Dropout(dropout)]
        width = units
    return blocks


class MLP(nn.Module):
    """The seed's MLP (and, with a lookup table, `lookup_mlp`)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.sees_primary = config.sees_primary  # plain attributes for TorchScript
        self.register_buffer("slot", torch.arange(config.history_len).unsqueeze(0), persistent=False)
        self.layer_emb = nn.Embedding(config.num_layers, config.layer_emb)
        self.expert_emb = nn.Embedding(config.num_experts + 1, config.expert_emb, padding_idx=0)
        last = config.architecture[-1] if config.architecture else config.input_width
        self.mlp = nn.Sequential(*hidden_blocks(config.input_width, config.architecture, config.dropout),
                                 nn.Linear(last, config.num_experts))

    def features(self, layer: torch.Tensor, primary: torch.Tensor, secondary: torch.Tensor, history: torch.Tensor,
                 gating: torch.Tensor, position: torch.Tensor, prev: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        history = history * (self.slot <= layer.unsqueeze(1))  # causal by construction: nothing past layer l
        ids = [secondary.unsqueeze(1), history, prev]
        if not self.sees_primary:
            ids.append(primary.unsqueeze(1) + 1)
        # One lookup for every expert id (adjacent in the input): one gather and one gradient scatter.
        experts = self.expert_emb(torch.cat(ids, dim=1)).flatten(1)
        return torch.cat([self.layer_emb(layer), experts, gating, position.unsqueeze(1), extra], dim=1)

    def forward(self, layer: torch.Tensor, primary: torch.Tensor, secondary: torch.Tensor, history: torch.Tensor,
                gating: torch.Tensor, position: torch.Tensor, prev: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.features(layer, primary, secondary, history, gating, position, prev, extra))


class LookupMLP(MLP):
    """logits = scale * log P_lookup + MLP(features, log P_lookup): starts at the table (scale 1,
    zero last Linear). The table's smoothed probabilities are sharp (a context seen a few times
    puts almost nothing on unseen experts), so `scale` learns how far to trust them.

    The ladder (layer, e) -> (layer, e-1, e) -> (layer, e-2, e-1, e) lives in buffers: per order, the
    sorted context keys seen in training and their target counts; an unseen key backs off to the
    shorter context, as `routecast.predictors.references.LookupPredictor` (which fits the same counts)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
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

    def _back_off(self, probs: torch.Tensor, keys: torch.Tensor, counts: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """A seen key's counts pulled towards `probs` (the shorter context) by the pseudo-count."""
        if keys.numel() == 0:
            return probs
        pos = torch.searchsorted(keys, key).clamp(max=keys.numel() - 1)
        row = torch.where((keys[pos] == key).unsqueeze(1), counts[pos], torch.zeros_like(probs))
        return (row + self.pseudo_count * probs) / (row.sum(1, keepdim=True) + self.pseudo_count)

    def forward_with_table(self, table: torch.Tensor, layer: torch.Tensor, primary: torch.Tensor,
                           secondary: torch.Tensor, history: torch.Tensor, gating: torch.Tensor,
                           position: torch.Tensor, prev: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.features(layer, primary, secondary, history, gating, position, prev, extra), table], 1)
        return self.scale * table + self.mlp(x)

    def forward(self, layer: torch.Tensor, primary: torch.Tensor, secondary: torch.Tensor, history: torch.Tensor,
                gating: torch.Tensor, position: torch.Tensor, prev: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        table = self.table_logp(layer, primary, history)
        return self.forward_with_table(table, layer, primary, secondary, history, gating, position, prev, extra)


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


class GRUPredictor(nn.Module):
    """A GRU over the token's layers; a head at layer l predicts layer l + lookahead."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        L, E = config.num_layers, config.num_experts
        self.slots, self.num_experts, self.lookahead = config.slots, E, config.lookahead  # for TorchScript
        self.sees_primary = config.sees_primary
        # (layer j, expert + 1) pairs: layer-specific expert embeddings, index j * (E + 1) + id.
        self.step_emb = nn.Embedding(L * (E + 1), config.expert_emb)
        self.head_emb = nn.Embedding(L * (E + 1), config.expert_emb)  # secondary, primary, prev at their layers
        self.drop = nn.Dropout(config.dropout)
        self.rnn = nn.GRU(config.expert_emb, config.hidden, num_layers=config.rnn_layers, batch_first=True,
                          dropout=config.dropout if config.rnn_layers > 1 else 0.0)
        ids = 1 + config.num_prev + (0 if config.sees_primary else 1)  # secondary, prev, primary
        width = config.hidden + config.expert_emb * ids + config.top_k + 1 + config.num_extra
        # Per-layer output projection: each layer maps the state (and layer l's other features) to the
        # next layer's experts with its own weights, held side by side as one [width, slots * E] matrix.
        self.out = nn.Linear(width, config.slots * E)

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
             gating: torch.Tensor, position: torch.Tensor, prev: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        base = layer.unsqueeze(1) * (self.num_experts + 1)
        ids = [base + secondary.unsqueeze(1), base + self.lookahead * (self.num_experts + 1) + prev]  # prev: target layer
        if not self.sees_primary:
            ids.append(base + primary.unsqueeze(1) + 1)
        x = torch.cat([state, self.head_emb(torch.cat(ids, 1)).flatten(1), gating, position.unsqueeze(1), extra], 1)
        every_layer = self.out(self.drop(x)).view(x.shape[0], self.slots, self.num_experts)
        return every_layer[torch.arange(x.shape[0], device=x.device), layer]

    def forward_tokens(self, history: torch.Tensor, token: torch.Tensor, layer: torch.Tensor, primary: torch.Tensor,
                       secondary: torch.Tensor, gating: torch.Tensor, position: torch.Tensor, prev: torch.Tensor,
                       extra: torch.Tensor) -> torch.Tensor:
        """Logits for samples (token[i], layer[i]) of the tokens whose paths are `history` [B, H]:
        every path is read once, however many of its layers are asked for. A sample's own history
        is a prefix of its token's, and the GRU is causal, so this equals `forward` per sample."""
        state = self.path_states(history)[token, layer]
        return self.head(state, layer, primary, secondary, gating, position, prev, extra)

    def forward(self, layer: torch.Tensor, primary: torch.Tensor, secondary: torch.Tensor, history: torch.Tensor,
                gating: torch.Tensor, position: torch.Tensor, prev: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        token = torch.arange(layer.shape[0], device=layer.device)
        return self.forward_tokens(history, token, layer, primary, secondary, gating, position, prev, extra)


def build_model(config: ModelConfig) -> nn.Module:
    return {"mlp": MLP, "lookup_mlp": LookupMLP, "gru": GRUPredictor}[config.kind](config)
