"""A latent-type mixture of per-layer Markov chains, fitted by EM: the `mixture` kind.

Each token is taken to have a hidden type z (one of `num_types`); given z, its primary expert
walks a Markov chain over the layers with per-layer tables, and the secondary at each layer
depends on (z, layer, primary). With `features.prev_token`, the previous token's primary at each
layer is one more per-type emission. EM fits the tables on the training tokens' whole paths:

    E step  r[t, z] = P(z | token t's path)   (log-space sum of its table entries)
    M step  tables  = responsibility-weighted counts, smoothed towards the pooled (all-types)
                      table with weight `smoothing`; the pooled table itself backs off to the
                      next layer's frequency, so a context never seen in training predicts that.

A prediction for layer l + lookahead filters the type posterior along what the sample shows
(the primaries at layers 0..l, the secondary at l, the previous token's expert), then pushes it
through the type's transition(s): exactly the synthetic oracle's computation with fitted tables.
A transition with an unseen end (a missing row, a truncated history) is skipped. Gate weights
and position are not used (in the synthetic generator they carry nothing about the type).

The fitted model is a torch module of table look-ups (`MixtureModule`), so it is scored, served
and exported like the neural kinds; an engine can also run it as plain table look-ups.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn
from tqdm import tqdm

from routecast.batches import token_view
from routecast.features import Features

log = logging.getLogger(__name__)


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
    target: str = "primary"  # primary | set: what the module's output ranks


@dataclass
class Paths:
    """Each training token's whole observed path (-1: unknown): the EM's data."""

    primary: np.ndarray  # int64 [T, L]
    secondary: np.ndarray  # int64 [T, L]
    prev: np.ndarray | None  # int64 [T, L]: the previous token's primary at each layer


def token_paths(feats: Features) -> Paths:
    """Reassemble every token's path from its samples: history and layer l's experts from the
    features, layer l + lookahead's from the targets (training data: the targets are known)."""
    view = token_view(feats)
    meta = feats.meta
    T, L, la = len(view), meta.num_layers, meta.lookahead
    primary = np.full((T, L), -1, dtype=np.int64)
    secondary = np.full((T, L), -1, dtype=np.int64)
    prev = np.full((T, L), -1, dtype=np.int64) if feats.prev_experts is not None else None
    h = min(view.history.shape[1], L)
    primary[:, :h] = view.history[:, :h].astype(np.int64) - 1
    t, slot = np.nonzero(view.present)
    rows = view.row[t, slot]
    primary[t, slot] = feats.primary[rows]
    primary[t, slot + la] = feats.target[rows]
    if meta.top_k > 1:
        secondary[t, slot] = feats.secondary[rows]
        secondary[t, slot + la] = feats.target_set[rows, 1]
    if prev is not None:
        prev[t, slot + la] = feats.prev_experts[rows, 0].astype(np.int64) - 1
    return Paths(primary, secondary, prev)


class _Counts:
    """Sparse one-hot designs (token x table cell), built once: a table's weighted counts are one
    sparse-dense product with the responsibilities."""

    def __init__(self, cells: np.ndarray, valid: np.ndarray, size: int) -> None:
        t, j = np.nonzero(valid)
        self.design = sp.csr_matrix((np.ones(len(t)), (t, cells[t, j])), shape=(valid.shape[0], size))
        self.cells, self.valid = cells, valid

    def counts(self, resp: np.ndarray) -> np.ndarray:
        return np.asarray(self.design.T @ resp).T  # [Z, size]

    def loglik(self, log_table: np.ndarray) -> np.ndarray:
        """sum over a token's valid cells of log_table[:, cell]: [T, Z]."""
        out = np.zeros((self.valid.shape[0], log_table.shape[0]))
        for j in range(self.valid.shape[1]):
            rows = np.flatnonzero(self.valid[:, j])
            out[rows] += log_table[:, self.cells[rows, j]].T
        return out


@dataclass
class MixtureTables:
    prior: np.ndarray  # [Z]
    init: np.ndarray  # [Z, E]
    trans: np.ndarray  # [Z, L-1, E, E]
    second: np.ndarray  # [Z, L, E, E]
    prev: np.ndarray | None  # [Z, L, E]
    loglik: float  # mean training log-likelihood per token


def _smooth(counts: np.ndarray, backoff: np.ndarray, weight: float) -> np.ndarray:
    """(counts + weight * backoff) / (row total + weight), over the last axis."""
    return (counts + weight * backoff) / (counts.sum(axis=-1, keepdims=True) + weight)


def fit_em(paths: Paths, config: MixtureConfig, seed: int) -> MixtureTables:
    """EM with `config.restarts` random starts; the run with the best training likelihood."""
    Z, L, E, k = config.num_types, config.num_layers, config.num_experts, config.top_k
    P, S = paths.primary, paths.secondary
    T = len(P)
    init_c = _Counts(P[:, :1].clip(0), P[:, :1] >= 0, E)
    trans_cells = np.arange(L - 1) * E * E + P[:, :-1].clip(0) * E + P[:, 1:].clip(0)
    trans_c = _Counts(trans_cells, (P[:, :-1] >= 0) & (P[:, 1:] >= 0), (L - 1) * E * E)
    second_c = _Counts(np.arange(L) * E * E + P.clip(0) * E + S.clip(0), (P >= 0) & (S >= 0), L * E * E) \
        if k > 1 else None
    prev_c = _Counts(np.arange(L) * E + paths.prev.clip(0), paths.prev >= 0, L * E) \
        if config.num_prev and paths.prev is not None else None

    # Type-independent backoffs: per-layer frequency of each expert, then the pooled tables.
    freq = np.bincount((np.arange(L) * E + P.clip(0))[P >= 0], minlength=L * E).reshape(L, E) + 1.0
    freq /= freq.sum(axis=1, keepdims=True)
    pooled_trans = _smooth(trans_c.counts(np.ones((T, 1)))[0].reshape(L - 1, E, E), freq[1:, None, :], 1.0)
    pooled_init = _smooth(init_c.counts(np.ones((T, 1)))[0], freq[0], 1.0)
    if second_c is not None:
        off = 1.0 - np.eye(E)
        pooled_second = second_c.counts(np.ones((T, 1)))[0].reshape(L, E, E) * off
        pooled_second = _smooth(pooled_second, freq[:, None, :] * off / (freq[:, None, :] * off).sum(-1, keepdims=True),
                                1.0)
    if prev_c is not None:
        pooled_prev = _smooth(prev_c.counts(np.ones((T, 1)))[0].reshape(L, E), freq, 1.0)

    def m_step(resp: np.ndarray) -> MixtureTables:
        a = config.smoothing
        prior = resp.sum(axis=0) + 1.0
        trans = _smooth(trans_c.counts(resp).reshape(Z, L - 1, E, E), pooled_trans[None], a)
        second = _smooth(second_c.counts(resp).reshape(Z, L, E, E) * off, pooled_second[None], a) \
            if second_c is not None else np.full((Z, L, E, E), 1.0 / E)
        prev = _smooth(prev_c.counts(resp).reshape(Z, L, E), pooled_prev[None], a) if prev_c is not None else None
        return MixtureTables(prior / prior.sum(), _smooth(init_c.counts(resp), pooled_init[None], a), trans, second,
                             prev, float("nan"))

    def e_step(tables: MixtureTables) -> tuple[np.ndarray, float]:
        with np.errstate(divide="ignore"):
            ll = np.log(tables.prior)[None] + init_c.loglik(np.log(tables.init))
            ll += trans_c.loglik(np.log(tables.trans).reshape(Z, -1))
            if second_c is not None:
                ll += second_c.loglik(np.log(tables.second).reshape(Z, -1))
            if prev_c is not None:
                ll += prev_c.loglik(np.log(tables.prev).reshape(Z, -1))
        top = ll.max(axis=1, keepdims=True)
        w = np.exp(ll - top)
        total = w.sum(axis=1, keepdims=True)
        return w / total, float((np.log(total) + top).mean())

    best: MixtureTables | None = None
    rng = np.random.default_rng(seed)
    for restart in range(config.restarts):
        start = time.perf_counter()
        tables = m_step(rng.dirichlet(np.ones(Z), size=T))
        previous = -np.inf
        for it in range(config.iterations):
            resp, loglik = e_step(tables)
            tables = m_step(resp)
            if loglik - previous < config.tolerance:
                break
            previous = loglik
        tables.loglik = loglik
        log.info("mixture: restart %d, %d types, %d iterations, log-likelihood %.4f per token, %.1fs", restart, Z,
                 it + 1, loglik, time.perf_counter() - start)
        if best is None or tables.loglik > best.loglik:
            best = tables
    assert best is not None
    return best


class MixtureModule(nn.Module):
    """The fitted mixture as look-ups: the same call as the neural kinds, returning log P(target)."""

    def __init__(self, config: MixtureConfig, tables: MixtureTables | None = None) -> None:
        super().__init__()
        self.config = config
        self.lookahead = config.lookahead  # a plain attribute for TorchScript
        Z, L, E, la = config.num_types, config.num_layers, config.num_experts, config.lookahead
        shapes = {"log_prior": (Z,), "log_init": (E, Z), "log_trans": (L - 1, E, E, Z), "log_second": (L, E, E, Z),
                  "log_prev": (L, E, Z) if config.num_prev else (0,), "out_table": (L - la, E, Z, E)}
        for name, shape in shapes.items():
            self.register_buffer(name, torch.zeros(shape))
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
        ahead = tables.trans[:, 0:L - la]  # [Z, S, E, E]: lookahead-step transition from layer l
        for d in range(1, la):
            ahead = np.einsum("zlab,zlbc->zlac", ahead, tables.trans[:, d:L - la + d])
        if c.target == "set" and c.top_k > 1:  # P(e in the target layer's top-k): primary or first secondary
            ahead = ahead + np.einsum("zlab,zlbc->zlac", ahead, tables.second[:, la:])
        self.out_table = torch.from_numpy(ahead.transpose(1, 2, 0, 3).copy()).float()  # [S, E, Z, E]

    def forward(self, layer: torch.Tensor, primary: torch.Tensor, secondary: torch.Tensor, history: torch.Tensor,
                gating: torch.Tensor, position: torch.Tensor, prev: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
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
        post = torch.softmax(ll, dim=1)  # P(type | what the sample shows)
        probs = torch.einsum("nz,nze->ne", post, self.out_table[layer, primary])
        return torch.log(probs.clamp_min(1e-12))


def fit_mixture(config: MixtureConfig, fit: Features, seed: int = 0) -> MixtureModule:
    start = time.perf_counter()
    paths = token_paths(fit)
    with tqdm(total=1, desc=f"mixture EM ({config.num_types} types)", leave=False):
        tables = fit_em(paths, config, seed)
    log.info("mixture: fitted %d types on %d tokens in %.1fs", config.num_types, len(paths.primary),
             time.perf_counter() - start)
    return MixtureModule(config, tables).eval()
