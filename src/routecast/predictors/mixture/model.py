"""A latent-type mixture of per-layer Markov chains: the `mixture` kind's module (fitted by EM in
`routecast.predictors.mixture.em`).

Each token is taken to have a hidden type z (one of `num_types`); given z, its primary expert
walks a Markov chain over the layers with per-layer tables, and the secondary at each layer
depends on (z, layer, primary). With `features.prev_token`, the previous token's primary at each
layer is one more per-type emission; with `features.token`, so is the token itself (its row in the
vocabulary of `routecast.predictors.tokens`: the tokens seen at least twice in training; every other
token shares row 0).

A prediction for layer l + lookahead filters the type posterior along what the sample shows
(the primaries at layers 0..l, the secondary at l, the previous token's expert, the token), then pushes it
through the type's transition(s): exactly the synthetic oracle's computation with fitted tables.
Every horizon d of `features.horizons` is the same posterior pushed d steps (`at_horizon(d)`): one
fit answers them all. The next token (`features.next_token`) at layer l repeats this token's experts
there with probability `persistence` (fitted by EM on the training pairs, `em.fit_persistence`), else
draws afresh from the types' prior: P(e) = rho [e in this token's set at l] + (1 - rho) sum_z
prior(z) P(e at l | z), the synthetic generator's own form (its oracle has the true rho and the
position's prior). With top_k > 2, "this token's set" is its primary and secondary (the module's inputs).
A transition with an unseen end (a missing row, a truncated history) is skipped. Gate weights
and position are not used (in the synthetic generator they carry nothing about the type).

The model is a torch module of table look-ups (`MixtureModule`), so it is scored, served and
exported like the neural kinds; an engine can also run it as plain table look-ups.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from routecast.config.params import NEXT_TOKEN
from routecast.predictors.horizons import at_horizon
from routecast.predictors.tokens import token_rows


@dataclass(frozen=True)
class MixtureConfig:
    num_layers: int
    num_experts: int
    top_k: int
    history_len: int
    lookahead: int = 1
    num_types: int = 32
    smoothing: float = 0.1  # weight of the pooled table in each type's (a Dirichlet pseudo-count)
    iterations: int = 200  # EM iterations at most (stops earlier once the log-likelihood settles)
    restarts: int = 3  # EM runs from different random starts; the best training likelihood wins
    tolerance: float = 1e-5  # stop when the mean log-likelihood per token gains less than this
    num_prev: int = 0  # width of the previous-token feature (0: off; the mixture reads its primary)
    num_extra: int = 0  # extra dense features: none are used (kept for the common call)
    token: bool = False  # read the token (features.token): one more per-type emission
    vocab_size: int = 0  # tokens with a row of their own in that emission (row 0: every other token)
    target: str = "primary"  # primary | set: what the module's output ranks
    horizons: tuple[int, ...] = ()  # every horizon it predicts (features.horizons); () reads as (lookahead,)

    def __post_init__(self) -> None:
        object.__setattr__(self, "horizons", tuple(self.horizons) or (self.lookahead,))

    @property
    def kind(self) -> str:
        return "mixture"

    @property
    def reads_token(self) -> bool:
        return self.token


@dataclass
class MixtureTables:
    prior: np.ndarray  # [Z]
    init: np.ndarray  # [Z, E]
    trans: np.ndarray  # [Z, L-1, E, E]
    second: np.ndarray  # [Z, L, E, E]
    prev: np.ndarray | None  # [Z, L, E]
    token: np.ndarray | None  # [Z, V + 1]: P(token's vocabulary row | type)
    vocab: np.ndarray | None  # int64 [V]: the token keys with a row of their own (sorted)
    loglik: float  # mean training log-likelihood per token
    persistence: float = 0.0  # P(the next token repeats this one's experts at a layer): features.next_token


class MixtureModule(nn.Module):
    """The fitted mixture as look-ups: the same call as the neural kinds, returning log P(target)."""

    def __init__(self, config: MixtureConfig, tables: MixtureTables | None = None) -> None:
        super().__init__()
        self.config = config
        self.lookahead = config.lookahead  # a plain attribute for TorchScript
        self.heads, self.horizon_head = len(config.horizons), 0  # the call returns horizon_head's (-1: every one)
        Z, L, E, la = config.num_types, config.num_layers, config.num_experts, config.lookahead
        # out_table: P(target at l + d = e | type, l, primary at l); with several horizons one per horizon
        # [H, L - la, E, Z, E] (a horizon d's rows past L - d are zeros: no sample reads them)
        out = (L - la, E, Z, E) if self.heads == 1 else (self.heads, L - la, E, Z, E)
        shapes = {"log_prior": (Z,), "log_init": (E, Z), "log_trans": (L - 1, E, E, Z), "log_second": (L, E, E, Z),
                  "log_prev": (L, E, Z) if config.num_prev else (0,), "out_table": out,
                  "log_token": (config.vocab_size + 1, Z) if config.token else (0,)}
        for name, shape in shapes.items():
            self.register_buffer(name, torch.zeros(shape))
        self.register_buffer("vocab", torch.zeros(config.vocab_size if config.token else 0, dtype=torch.long))
        # The next token's head (features.next_token, always the last) adds `persistence` to this token's
        # secondary at layer l (out_table holds the rest): [1] for a set target, else [0] (nothing to add).
        self.next_head = config.horizons.index(NEXT_TOKEN) if NEXT_TOKEN in config.horizons else -1
        repeat_second = self.next_head >= 0 and config.target == "set" and config.top_k > 1
        self.register_buffer("next_secondary", torch.zeros(1 if repeat_second else 0))
        if tables is not None:
            self.load_tables(tables)

    def load_tables(self, tables: MixtureTables) -> None:
        c = self.config
        L, la = c.num_layers, c.lookahead
        with np.errstate(divide="ignore"):
            self.log_prior = torch.from_numpy(np.log(tables.prior)).float()
            self.log_init = torch.from_numpy(np.log(tables.init).T.copy()).float()
            self.log_trans = torch.from_numpy(np.log(tables.trans).transpose(1, 2, 3, 0).copy()).float()
            self.log_second = torch.from_numpy(np.log(tables.second).transpose(1, 2, 3, 0).copy()).float()
            if tables.prev is not None and c.num_prev:
                self.log_prev = torch.from_numpy(np.log(tables.prev).transpose(1, 2, 0).copy()).float()
            if tables.token is not None and c.token:
                self.log_token = torch.from_numpy(np.log(tables.token).T.copy()).float()
                self.vocab = torch.from_numpy(np.asarray(tables.vocab, dtype=np.int64))
        per_horizon = []
        for d in c.horizons:
            if d == NEXT_TOKEN:
                per_horizon.append(self._next_token_table(tables))
                continue
            ahead = tables.trans[:, 0:L - d]  # [Z, L - d, E, E]: the d-step transition from layer l
            for step in range(1, d):
                ahead = np.einsum("zlab,zlbc->zlac", ahead, tables.trans[:, step:L - d + step])
            if c.target == "set" and c.top_k > 1:  # P(e in the target layer's top-k): primary or first secondary
                ahead = ahead + np.einsum("zlab,zlbc->zlac", ahead, tables.second[:, d:])
            padded = np.zeros((tables.trans.shape[0], L - la, *ahead.shape[2:]))
            padded[:, :L - d] = ahead
            per_horizon.append(padded.transpose(1, 2, 0, 3))  # [L - la, E, Z, E]
        out = per_horizon[0] if self.heads == 1 else np.stack(per_horizon)
        self.out_table = torch.from_numpy(np.ascontiguousarray(out)).float()
        if self.next_secondary.numel():
            self.next_secondary = torch.tensor([tables.persistence], dtype=torch.float32)

    def _next_token_table(self, tables: MixtureTables) -> np.ndarray:
        """[L - la, E, Z, E]: P(the next token's target at layer l = e | primary at l) for every type:
        rho [e = primary] + (1 - rho) * the fresh draw's sum_z prior(z) P(e at l | z) (`fresh_marginal`)."""
        c = self.config
        rows = c.num_layers - c.lookahead
        rho = tables.persistence
        fresh = fresh_marginal(tables, c.target == "set" and c.top_k > 1)[:rows]  # [rows, E]
        E, Z = c.num_experts, len(tables.prior)
        table = np.broadcast_to(((1 - rho) * fresh)[:, None, None, :], (rows, E, Z, E)).copy()
        table[:, np.arange(E), :, np.arange(E)] += rho
        return table

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        state_dict.setdefault(prefix + "next_secondary", torch.zeros(0))  # checkpoints before features.next_token
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def at_horizon(self, d: int) -> nn.Module:
        return at_horizon(self, d)

    def forward(self, layer: torch.Tensor, primary: torch.Tensor, secondary: torch.Tensor, history: torch.Tensor,
                gating: torch.Tensor, position: torch.Tensor, prev: torch.Tensor, extra: torch.Tensor,
                token: torch.Tensor) -> torch.Tensor:
        e = history - 1  # -1: unknown
        H = e.shape[1]
        first = e[:, 0].clamp(min=0)
        ll = self.log_prior + torch.where((e[:, :1] >= 0), self.log_init[first], torch.zeros_like(self.log_init[first]))
        if H > 1:
            j = torch.arange(H - 1, device=e.device)
            steps = self.log_trans[j, e[:, :-1].clamp(min=0), e[:, 1:].clamp(min=0)]  # [N, H-1, Z]
            valid = (e[:, :-1] >= 0) & (e[:, 1:] >= 0) & (j.unsqueeze(0) < layer.unsqueeze(1))
            ll = ll + (steps * valid.unsqueeze(2)).sum(1)
        has_second = (secondary > 0).unsqueeze(1)
        second = self.log_second[layer, primary, (secondary - 1).clamp(min=0)]
        ll = ll + torch.where(has_second, second, torch.zeros_like(second))
        if self.log_prev.dim() == 3 and prev.shape[1] > 0:
            emitted = self.log_prev[layer + self.lookahead, (prev[:, 0] - 1).clamp(min=0)]
            ll = ll + torch.where((prev[:, :1] > 0), emitted, torch.zeros_like(emitted))
        if self.log_token.dim() == 2:
            ll = ll + self.log_token[token_rows(self.vocab, token)]
        post = torch.softmax(ll, dim=1)  # P(type | what the sample shows)
        if self.heads == 1:
            probs = torch.einsum("nz,nze->ne", post, self.out_table[layer, primary])
        elif self.horizon_head >= 0:
            probs = torch.einsum("nz,nze->ne", post, self.out_table[self.horizon_head, layer, primary])
            if self.horizon_head == self.next_head:
                probs = probs + self.repeated_secondary(secondary, probs.shape[1])
        else:  # every horizon: [N, H, E]
            probs = torch.einsum("nz,hnze->nhe", post, self.out_table[:, layer, primary])
            if self.next_head >= 0 and self.next_secondary.numel() > 0:
                repeat = torch.zeros_like(probs)
                repeat[:, self.next_head] = self.repeated_secondary(secondary, probs.shape[2])
                probs = probs + repeat
        return torch.log(probs.clamp_min(1e-12))

    def repeated_secondary(self, secondary: torch.Tensor, num_experts: int) -> torch.Tensor:
        """The next token's repeat of this token's secondary (+1 ids; 0: none) as [N, E] set mass."""
        out = torch.zeros((secondary.shape[0], num_experts), device=secondary.device)
        if self.next_secondary.numel() > 0:
            has = (secondary > 0).float() * self.next_secondary[0]
            out = out.scatter(1, (secondary - 1).clamp(min=0).unsqueeze(1), has.unsqueeze(1))
        return out


def fresh_marginal(tables: MixtureTables, as_set: bool) -> np.ndarray:
    """[L, E]: a fresh token's P(primary at layer l = e) (`as_set`: P(e in its top-k), primary or first
    secondary), summed over the types' prior."""
    marg = [tables.init]  # [Z, E] per layer
    for j in range(tables.trans.shape[1]):
        marg.append(np.einsum("za,zab->zb", marg[-1], tables.trans[:, j]))
    per_type = np.stack(marg, axis=1)  # [Z, L, E]
    if as_set:
        per_type = per_type + np.einsum("zla,zlab->zlb", per_type, tables.second)
    return np.einsum("z,zle->le", tables.prior, per_type)
