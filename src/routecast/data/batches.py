"""Samples as model inputs: per-sample tensors, and the per-token view sequence models train on.

`sample_inputs(feats)` is the only place `Features` become tensors. Every kind's module takes
them in this order (see `routecast.predictors.neural`):

    layer     int64 [N]       l
    primary   int64 [N]       the primary expert at layer l (0..E-1)
    secondary int64 [N]       the 2nd expert at layer l, +1 (0: top_k = 1)
    history   int64 [N, H]    primaries at layers 0..l, +1 (0: padding or a missing row)
    gating    float32 [N, k]  the gate weights at layer l
    position  float32 [N]     min(token_pos / position_scale, 1)
    prev      int64 [N, P]    the previous token's top-k at the target layer, +1 (P = 0 when off)
    extra     float32 [N, X]  spec_logits (X = 0 when off)
    token     int64 [N]       the token's key (features.token: its id or text hash; -1: none or off)

`TokenView` groups the samples of each token (they are contiguous and in layer order in every
split) so a sequence model reads each token's path once and predicts every layer of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from routecast.data.features import Features, token_keys
from routecast.errors import InputError


class Inputs(NamedTuple):
    layer: torch.Tensor
    primary: torch.Tensor
    secondary: torch.Tensor
    history: torch.Tensor
    gating: torch.Tensor
    position: torch.Tensor
    prev: torch.Tensor
    extra: torch.Tensor
    token: torch.Tensor

    def index(self, idx: torch.Tensor | slice) -> Inputs:
        return Inputs(*(t[idx] for t in self))

    def to(self, device: torch.device | str) -> Inputs:
        return Inputs(*(t.to(device, non_blocking=True) for t in self))


def _tensor(values: np.ndarray, dtype: type) -> torch.Tensor:
    """`values` as a `dtype` tensor, sharing their memory where it can. A column read from Parquet
    is a read-only view of Arrow's buffer, which `torch.from_numpy` warns about (a tensor may be
    written to): such an array is copied once here, and only where no dtype conversion copies it
    anyway."""
    return torch.from_numpy(np.require(values, dtype=dtype, requirements=("C", "W")))


def sample_inputs(feats: Features, use_prev: bool = False, use_extra: bool = False,
                  use_token: bool = False) -> Inputs:
    """The model inputs of every sample of `feats` (see the module doc for the encodings)."""
    n = len(feats)
    if use_token and feats.token is None:
        raise InputError("the model was trained with features.token, but these samples have no token column: "
                         "encode them with features.token: true")
    if use_prev and feats.prev_experts is None:
        raise InputError("the model was trained with features.prev_token, but these samples have no prev_experts "
                         "column: encode them with features.prev_token: true")
    if use_extra and feats.spec_logits is None:
        raise InputError("the model was trained with spec_logits, but these samples have none")
    prev = feats.prev_experts if use_prev else np.zeros((n, 0), np.int64)
    extra = feats.spec_logits if use_extra else np.zeros((n, 0), np.float32)
    return Inputs(
        layer=torch.from_numpy(feats.layer.astype(np.int64)),
        primary=torch.from_numpy(feats.primary.astype(np.int64)),
        secondary=torch.from_numpy(feats.secondary.astype(np.int64) + 1),
        history=torch.from_numpy(feats.history.astype(np.int64)),
        gating=_tensor(feats.gating, np.float32),
        position=torch.from_numpy(feats.position.astype(np.float32)),
        prev=_tensor(prev, np.int64),
        extra=_tensor(extra, np.float32),
        token=torch.from_numpy(feats.token.astype(np.int64)) if use_token else torch.full((n,), -1, dtype=torch.long),
    )


def targets(feats: Features, target: str, every_horizon: bool = False) -> torch.Tensor:
    """`primary`: the next layer's primary expert [N]; `set`: its top-k set as a 0/1 matrix [N, E].

    `every_horizon` (features with several horizons): the target at every horizon, -1 where a
    sample has none: `primary` [N, H], `set` the expert ids [N, H, k] (not a 0/1 matrix: H times
    the memory of one horizon's would not fit at DeepSeek's scale)."""
    if every_horizon and feats.horizon_set is not None:
        ahead = torch.from_numpy(feats.horizon_set.astype(np.int64))
        return ahead[:, :, 0].contiguous() if target == "primary" else ahead
    if target == "primary":
        return torch.from_numpy(feats.target.astype(np.int64))
    multi = np.zeros((len(feats), feats.meta.num_experts), dtype=np.float32)
    multi[np.arange(len(feats))[:, None], feats.target_set.astype(np.int64)] = 1.0
    return torch.from_numpy(multi)


@dataclass
class TokenView:
    """The samples of each token side by side: slot s of token t is its sample at layer s.

    `row[t, s]` is that sample's row in the Features (-1: no such sample, e.g. a missing trace
    row); `history[t]` is the history of the token's deepest sample, so for every sample of the
    token, its own history is a prefix of it (entries past its layer are padding there).
    """

    row: np.ndarray  # int64 [T, S]
    history: np.ndarray  # int16 [T, H]

    @property
    def present(self) -> np.ndarray:
        return self.row >= 0

    def __len__(self) -> int:
        return len(self.row)


def token_view(feats: Features) -> TokenView:
    meta = feats.meta
    slots = meta.num_layers - meta.lookahead
    keys = token_keys(feats.seq_id, feats.token_pos)
    new = np.ones(len(keys), dtype=bool)
    new[1:] = keys[1:] != keys[:-1]
    token = np.cumsum(new) - 1
    if len(keys) and not ((keys[1:] > keys[:-1]) | (~new[1:] & (feats.layer[1:] > feats.layer[:-1]))).all():
        raise ValueError("samples are not in (sequence, token, layer) order: encode_features and split_95_5 keep it")
    n_tokens = int(token[-1]) + 1 if len(token) else 0
    row = np.full((n_tokens, slots), -1, dtype=np.int64)
    row[token, feats.layer.astype(np.int64)] = np.arange(len(keys))
    last = np.flatnonzero(np.append(new[1:], True))  # each token's deepest sample
    return TokenView(row=row, history=feats.history[last])


@torch.no_grad()
def predict_logits(module: torch.nn.Module, feats: Features, batch_size: int = 8192,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """`module`'s output for every sample of `feats` ([N, E], on the CPU; within `every_head` of a
    module with several heads, [N, heads, E]), in eval mode.

    A sequence model (one with `forward_tokens`) reads each token's path once for all its
    samples; a kind that reads whole sequences (`predict_samples`: the context kind) takes the
    samples as they are; any other kind runs on slices of the per-sample inputs."""
    if hasattr(module, "predict_samples"):
        return module.predict_samples(feats, batch_size, device)
    module.eval()
    config = module.config
    inputs = sample_inputs(feats, use_prev=config.num_prev > 0, use_extra=config.num_extra > 0,
                           use_token=config.reads_token)
    E = feats.meta.num_experts
    every = getattr(module, "heads", 1) > 1 and getattr(module, "horizon_head", 0) < 0  # within every_head
    out = torch.empty((len(feats), module.heads, E) if every else (len(feats), E))
    if not hasattr(module, "forward_tokens"):
        for i in range(0, len(feats), batch_size):
            out[i:i + batch_size] = module(*inputs.index(slice(i, i + batch_size)).to(device)).float().cpu()
        return out
    view = token_view(feats)
    per_batch = max(1, batch_size // max(view.row.shape[1], 1))
    history = torch.from_numpy(view.history.astype(np.int64))
    for t0 in range(0, len(view), per_batch):
        rows = view.row[t0:t0 + per_batch]
        token, _ = np.nonzero(rows >= 0)
        sample = torch.from_numpy(rows[rows >= 0])
        x = inputs.index(sample).to(device)
        logits = module.forward_tokens(history[t0:t0 + per_batch].to(device), torch.from_numpy(token).to(device),
                                       x.layer, x.primary, x.secondary, x.gating, x.position, x.prev, x.extra,
                                       x.token)
        out[sample] = logits.float().cpu()
    return out
