"""Fit the `mixture` kind (`routecast.predictors.mixture.model`) by expectation-maximisation on the training tokens.

    E step  r[t, z] = P(z | token t's whole path)   (log-space sum of its table entries)
    M step  tables  = responsibility-weighted counts, smoothed towards the pooled (all-types)
                      table with weight `smoothing`; the pooled table itself backs off to the
                      next layer's frequency, so a context never seen in training predicts that.

`config.restarts` runs from random starts; the best training likelihood wins. Each token's path
is reassembled from its samples (the training targets are known), so one token counts once.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from tqdm import tqdm

from routecast.config.params import NEXT_TOKEN, TrainParams
from routecast.data.batches import token_view
from routecast.data.features import Features
from routecast.fit.training import EpochCallback, TrainResult, scored_once
from routecast.predictors.mixture import MixtureParams
from routecast.predictors.mixture.model import MixtureConfig, MixtureModule, MixtureTables, fresh_marginal
from routecast.predictors.tokens import TOKEN_MIN_COUNT, build_vocab, token_rows

log = logging.getLogger(__name__)


@dataclass
class Paths:
    """Each training token's whole observed path (-1: unknown): the EM's data."""

    primary: np.ndarray  # int64 [T, L]
    secondary: np.ndarray  # int64 [T, L]
    prev: np.ndarray | None  # int64 [T, L]: the previous token's primary at each layer
    token: np.ndarray | None  # int64 [T]: the token's row in `vocab` (0: not in it), with features.token
    vocab: np.ndarray | None  # int64 [V]: the token keys seen at least TOKEN_MIN_COUNT times (sorted)


def token_paths(feats: Features, use_token: bool = False) -> Paths:
    """Reassemble every token's path from its samples: history and layer l's experts from the
    features, layer l + lookahead's from the targets (training data: the targets are known); and,
    with `use_token`, the token's vocabulary row."""
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
    token = vocab = None
    if use_token and feats.token is not None:
        vocab = build_vocab(feats, TOKEN_MIN_COUNT)
        first = view.row[np.arange(T), view.present.argmax(1)]  # any of the token's samples carries its key
        token = token_rows(torch.from_numpy(vocab), torch.from_numpy(feats.token[first].astype(np.int64))).numpy()
    return Paths(primary, secondary, prev, token, vocab)


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
    V = config.vocab_size + 1
    token_c = _Counts(paths.token[:, None], np.ones((T, 1), dtype=bool), V) \
        if config.token and paths.token is not None else None

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
    if token_c is not None:
        pooled_token = _smooth(token_c.counts(np.ones((T, 1)))[0], np.full(V, 1.0 / V), 1.0)

    def m_step(resp: np.ndarray) -> MixtureTables:
        a = config.smoothing
        prior = resp.sum(axis=0) + 1.0
        trans = _smooth(trans_c.counts(resp).reshape(Z, L - 1, E, E), pooled_trans[None], a)
        second = _smooth(second_c.counts(resp).reshape(Z, L, E, E) * off, pooled_second[None], a) \
            if second_c is not None else np.full((Z, L, E, E), 1.0 / E)
        prev = _smooth(prev_c.counts(resp).reshape(Z, L, E), pooled_prev[None], a) if prev_c is not None else None
        token = _smooth(token_c.counts(resp), pooled_token[None], a) if token_c is not None else None
        return MixtureTables(prior / prior.sum(), _smooth(init_c.counts(resp), pooled_init[None], a), trans, second,
                             prev, token, paths.vocab if token_c is not None else None, float("nan"))

    def e_step(tables: MixtureTables) -> tuple[np.ndarray, float]:
        with np.errstate(divide="ignore"):
            ll = np.log(tables.prior)[None] + init_c.loglik(np.log(tables.init))
            ll += trans_c.loglik(np.log(tables.trans).reshape(Z, -1))
            if second_c is not None:
                ll += second_c.loglik(np.log(tables.second).reshape(Z, -1))
            if prev_c is not None:
                ll += prev_c.loglik(np.log(tables.prev).reshape(Z, -1))
            if token_c is not None:
                ll += token_c.loglik(np.log(tables.token))
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
        for it in range(config.iterations):  # noqa: B007 (the count is logged after the loop)
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


def fit_persistence(fit: Features, tables: MixtureTables, iterations: int = 200) -> float:
    """rho, the share of next tokens that repeat this token's primary at a layer beyond what a fresh
    draw gives: the maximum-likelihood weight of a two-part mixture over the training pairs (this
    token's primary p at layer l, the next token's a there), P(a) = rho [a = p] + (1 - rho) f_l(a),
    f the types' fresh marginal (`fresh_marginal`). EM on one weight: each pair's share of the repeat
    part, averaged, until it settles."""
    j = fit.meta.horizons.index(NEXT_TOKEN)
    assert fit.horizon_set is not None  # features.next_token: written by encode_features
    rows = np.flatnonzero(fit.horizon_set[:, j, 0] >= 0)
    if len(rows) == 0:
        log.info("mixture: no training pair of consecutive tokens; persistence 0")
        return 0.0
    nxt = fit.horizon_set[rows, j, 0].astype(np.int64)
    same = nxt == fit.primary[rows]
    fresh = fresh_marginal(tables, as_set=False)[fit.layer[rows].astype(np.int64), nxt]
    rho = 0.5
    for _ in range(iterations):
        repeat = np.where(same, rho / (rho + (1 - rho) * fresh), 0.0)
        new = float(repeat.mean())
        if abs(new - rho) < 1e-9:
            break
        rho = new
    log.info("mixture: persistence %.4f from %d pairs of consecutive tokens (%.1f%% repeat the primary)", new,
             len(rows), 100 * same.mean())
    return new


def fit_mixture(config: MixtureConfig, fit: Features, seed: int = 0) -> MixtureModule:
    start = time.perf_counter()
    paths = token_paths(fit, use_token=config.token)
    with tqdm(total=1, desc=f"mixture EM ({config.num_types} types)", leave=False):
        tables = fit_em(paths, config, seed)
    if NEXT_TOKEN in config.horizons:
        tables.persistence = fit_persistence(fit, tables)
    log.info("mixture: fitted %d types on %d tokens in %.1fs", config.num_types, len(paths.primary),
             time.perf_counter() - start)
    return MixtureModule(config, tables).eval()


def fit(params: MixtureParams, train: TrainParams, fit_split: Features, val: Features, epochs: int,
        on_epoch: EpochCallback | None, desc: str) -> TrainResult:
    """EM to convergence (`routecast.predictors.mixture.em`), scored once on validation."""
    m = fit_split.meta
    use_token = fit_split.token is not None
    config = MixtureConfig(m.num_layers, m.num_experts, m.top_k, m.history_len, m.lookahead, params.num_types,
                           params.smoothing, params.iterations, params.restarts,
                           num_prev=m.top_k if fit_split.prev_experts is not None else 0, token=use_token,
                           vocab_size=len(build_vocab(fit_split, TOKEN_MIN_COUNT)) if use_token else 0,
                           target=train.target, horizons=m.horizons)
    start = time.perf_counter()
    module = fit_mixture(config, fit_split, seed=train.seed)
    result = scored_once(module, train, fit_split, val, epochs, time.perf_counter() - start, on_epoch)
    row = result.history[-1]
    label = desc if "(mixture)" in desc else f"{desc} (mixture)"  # a trial's or finalist's desc names the kind
    log.info("%s: val top-2 %.4f, set recall %.4f (%.1fs)", label, row["val_top2"], row["val_set_recall"],
             row["seconds"])
    return result


def load(config: dict) -> MixtureModule:
    config = {k: v for k, v in config.items() if k != "token_emb"}  # checkpoints before the mixture read tokens
    return MixtureModule(MixtureConfig(**config))
