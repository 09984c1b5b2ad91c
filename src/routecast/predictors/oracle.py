"""The exact Bayes-optimal predictor for synthetic traces: the accuracy ceiling of the task.

A synthetic token draws a hidden type `z`, then walks a per-type Markov chain over primary
experts; the secondary at layer l depends on `(z, l, e_l)`; the gate weights are independent of
everything. With probability `route_persistence` a token instead repeats the previous token's
routing whole (type and experts). So a token's type has the marginal prior

    m_t = rho * m_{t-1} + (1 - rho) * P(z | pos_t),     m_0 = P(z | pos_0),

and, given exactly a sample's features (layer l, the primaries at layers 0..l, the secondary at
l, the gate weights, the position), the posterior over its type is, by Bayes,

    P(z | own features) ~ m_t(z) * P(e_0 | z) * prod_{j<l} P(e_{j+1} | z, j, e_j) * P(secondary_l | z, l, e_l),

and the prediction for layer l + lookahead is sum_z P(z | features) * [T_l ... T_{l+lookahead-1}](z, e_l, .).

With `features.prev_token` the sample also shows the previous token's top-k at the target layer
(a, b...). Two branches explain the observations: the token repeated the previous one (weight
rho; then its own path and the previous token's top-k come from one chain of type z ~ m_{t-1},
and the target is `a`), or it drew afresh (weight 1 - rho; its type z ~ P(z | pos_t) and the
previous token's type z' ~ m_{t-1} are independent). Both are closed forms in the tables.

The next token at layer l (`features.next_token`, `Features.at_horizon(NEXT_TOKEN)`) repeats this
token's routing (weight rho), or draws afresh, independent of everything seen: its type from
P(z | pos_{t+1}), its path from that type's chain. So, exactly,

    P(next token's primary at l = e | features) = rho [e = primary_l] + (1 - rho) sum_z P(z | pos_{t+1}) P(e_l = e | z)

and likewise for set membership with this token's whole set at layer l (`current_set`).

Set scores (`set_scores`) are P(expert e is in the target layer's top-k): exact for top_k <= 2
(the primary's distribution plus the first secondary's); for top_k > 2 they count the first
secondary only.

Rows whose history is complete use the closed form in log space. Rows with a missing or
truncated history entry (real logs drop rows; `history_len` may cut the history short) run the
forward algorithm over (type, expert) instead, summing out the unseen experts. Everything is
vectorised over samples and processed in chunks to bound memory. The token's position is read
from the samples' `token_pos` (the generator's prior is a function of it).

`spec_logits`, when present, are not used: they are an extra feature beyond the seed's, drawn
from the true next layer, so the speculative gate may beat this ceiling, and that is expected.
"""

from __future__ import annotations

import numpy as np

from routecast.config.params import NEXT_TOKEN, POSITION_SCALE, SyntheticParams
from routecast.data.features import Features
from routecast.data.traces import TraceMeta
from routecast.sources.synthetic import SyntheticRouter, build_router

_CHUNK = 32_768  # samples per chunk: bounds the [chunk, types, experts] temporaries


class OraclePredictor:
    """Predictor-protocol wrapper: `fit` ignores train; scores are exact posterior probabilities."""

    name = "oracle"

    def __init__(self, router: SyntheticRouter) -> None:
        self.router = router

    @classmethod
    def from_trace_meta(cls, meta: TraceMeta) -> OraclePredictor:
        """Rebuild the generator's tables from the trace's metadata (`source_params`)."""
        if meta.source != "synthetic":
            raise ValueError(f"the oracle exists only for synthetic traces, this one comes from {meta.source!r}")
        known = set(SyntheticParams.__dataclass_fields__)
        return cls(build_router(SyntheticParams(**{k: v for k, v in meta.source_params.items() if k in known})))

    def fit(self, train: Features) -> OraclePredictor:
        return self

    def scores(self, test: Features) -> np.ndarray:
        return next_layer_probs(self.router, test, target="primary")

    def set_scores(self, test: Features) -> np.ndarray:
        return next_layer_probs(self.router, test, target="set")

    def expected_topk_accuracy(self, test: Features, k: int = 2) -> float:
        """The top-k accuracy this oracle expects on `test` (no targets needed): see the function."""
        return expected_topk_accuracy(self.scores(test), k)


def expected_topk_accuracy(probs: np.ndarray, k: int = 2) -> float:
    """The accuracy a predictor whose `probs` are the true P(target | features) expects: the mean
    over samples of the probability mass of its own top-k."""
    if len(probs) == 0:
        return float("nan")
    k = min(k, probs.shape[1])
    return float(np.sort(probs, axis=1)[:, -k:].sum(axis=1).mean())


def posterior_next_expert(router: SyntheticRouter, feats: Features) -> np.ndarray:
    """P(primary at layer l + lookahead = e | features) for every sample: [N, num_experts], float64."""
    return next_layer_probs(router, feats, target="primary")


def next_layer_probs(router: SyntheticRouter, feats: Features, target: str = "primary") -> np.ndarray:
    """[N, E] float64: P(primary = e) (`target="primary"`) or P(e in the top-k set) (`"set"`) at
    layer l + lookahead, given exactly each sample's features."""
    meta = feats.meta
    p = router.params
    if (meta.num_layers, meta.num_experts) != (p.num_layers, p.num_experts):
        raise ValueError(f"features have {meta.num_layers} layers x {meta.num_experts} experts, the router "
                         f"{p.num_layers} x {p.num_experts}: not the trace this router generated")
    n, E = len(feats), p.num_experts
    out = np.empty((n, E))
    if n == 0:
        return out
    if meta.lookahead == NEXT_TOKEN:
        return next_token_probs(router, feats, target)
    tables = _Tables(router, meta.lookahead)
    layer = feats.layer.astype(np.int64)
    history = feats.history.astype(np.int64)
    H = history.shape[1]
    cols = np.arange(H)[None, :]
    complete = (layer < H) & ~((history == 0) & (cols <= layer[:, None])).any(axis=1)
    token_pos = feats.token_pos.astype(np.int64)
    fresh_prior, marginal = _type_priors(router, int(token_pos.max()))
    prev = feats.prev_experts.astype(np.int64) - 1 if feats.prev_experts is not None else None
    for rows, loglik in ((np.flatnonzero(complete), _complete_loglik), (np.flatnonzero(~complete), _forward_loglik)):
        # Sorted by layer, highest first: the rows still walking at step j are a prefix.
        rows = rows[np.argsort(-layer[rows], kind="stable")]
        for start in range(0, len(rows), _CHUNK):
            r = rows[start:start + _CHUNK]
            ll = loglik(tables, layer[r], history[r], feats.primary[r].astype(np.int64),
                        feats.secondary[r].astype(np.int64))
            out[r] = _predict(tables, router, ll, layer[r], feats.primary[r].astype(np.int64), token_pos[r],
                              fresh_prior, marginal, None if prev is None else prev[r], target)
    return out


def next_token_probs(router: SyntheticRouter, feats: Features, target: str = "primary") -> np.ndarray:
    """[N, E]: P(the next token's primary at layer l = e) or P(e in its top-k there), given each
    sample's features (see the module doc: a repeat of this token's experts at l, or a fresh draw)."""
    rho = router.params.route_persistence
    tables = _Tables(router, 1)
    layer = feats.layer.astype(np.int64)
    fresh_type = router.type_prior(np.minimum((feats.token_pos.astype(np.int64) + 1) / POSITION_SCALE, 1.0))
    per_type = tables.primary_marginal  # [Z, L, E]
    if target == "set" and router.params.top_k > 1:
        per_type = per_type + np.einsum("zla,zlab->zlb", per_type, router.second)  # first secondary: exact for k <= 2
    out = np.empty((len(feats), router.params.num_experts))
    for start in range(0, len(feats), _CHUNK):
        r = slice(start, start + _CHUNK)
        out[r] = (1 - rho) * np.einsum("nz,nze->ne", fresh_type[r], per_type[:, layer[r]].transpose(1, 0, 2))
    rows = np.arange(len(feats))
    if target == "set" and router.params.top_k > 1:
        if feats.current_set is None:
            raise ValueError("the next token's set: the features have no current_set (written by encode_features)")
        np.add.at(out, (rows[:, None], feats.current_set.astype(np.int64)), rho)
    else:
        out[rows, feats.primary.astype(np.int64)] += rho
    return out


def _type_priors(router: SyntheticRouter, max_pos: int) -> tuple[np.ndarray, np.ndarray]:
    """P(z | pos) for a fresh draw and the marginal m_pos with persistence, for pos 0..max_pos: [T, Z] each."""
    pos = np.arange(max_pos + 1)
    fresh = router.type_prior(np.minimum(pos / POSITION_SCALE, 1.0))
    rho = router.params.route_persistence
    marginal = fresh.copy()
    if rho > 0:
        for t in range(1, len(pos)):
            marginal[t] = rho * marginal[t - 1] + (1 - rho) * fresh[t]
    return fresh, marginal


class _Tables:
    """Log tables laid out so that one gather returns a contiguous [types] vector per sample."""

    def __init__(self, router: SyntheticRouter, lookahead: int) -> None:
        L = router.params.num_layers
        with np.errstate(divide="ignore"):
            self.log_init = np.log(router.init).T.copy()  # [E, Z]
            self.log_trans = np.log(router.trans).transpose(1, 2, 3, 0).copy()  # [L-1, E, E', Z]
            self.log_second = np.log(router.second).transpose(1, 2, 3, 0).copy()  # [L, E, S, Z]
        self.init = router.init  # [Z, E]
        self.trans = router.trans  # [Z, L-1, E, E']
        self.second = router.second  # [Z, L, E, S]
        # lookahead-step transition from layer l: [L - lookahead, E, Z, E'] (types before targets).
        steps = router.trans[:, 0:L - lookahead]
        for d in range(1, lookahead):
            steps = np.einsum("zlab,zlbc->zlac", steps, router.trans[:, d:L - lookahead + d])
        self.ahead = steps.transpose(1, 2, 0, 3).copy()
        # P(primary at layer j = e | z): [Z, L, E]
        marg = [router.init]
        for j in range(L - 1):
            marg.append(np.einsum("za,zab->zb", marg[-1], router.trans[:, j]))
        self.primary_marginal = np.stack(marg, axis=1)

    def block_trans(self, j: int) -> np.ndarray:
        """Layer j's transition as one block-diagonal [Z*E, Z*E] matrix (type z's block at z*E)."""
        Z, E = self.trans.shape[0], self.trans.shape[-1]
        out = np.zeros((Z, E, Z, E))
        out[np.arange(Z), :, np.arange(Z), :] = self.trans[:, j]
        return out.reshape(Z * E, Z * E)


def _complete_loglik(tables: _Tables, layer, history, primary, secondary) -> np.ndarray:
    """log P(primaries 0..l, secondary_l | z) for rows with every history entry 0..l seen: [n, Z]."""
    e = history - 1  # observed experts (-1 past layer l, never read there)
    ll = tables.log_init[e[:, 0]].copy()
    for j in range(int(layer[0])):  # rows are sorted by layer, highest first
        m = int(np.searchsorted(-layer, -j, side="left"))  # rows with layer > j: a prefix
        if m == 0:
            break
        ll[:m] += tables.log_trans[j, e[:m, j], e[:m, j + 1]]
    return _add_secondary(tables, ll, layer, primary, secondary)


def _forward_loglik(tables: _Tables, layer, history, primary, secondary) -> np.ndarray:
    """The same for rows with unseen history entries: the forward algorithm over (type, expert).

    `alpha[i, z, e]` = P(z, e_j = e, what row i shows of layers 0..j), kept normalised with the
    log of every normaliser summed in `scale` (no underflow however long the chain). One step is a
    product with the block-diagonal [Z*E, Z*E] transition of layer j: one BLAS call for all rows.
    Layer l's primary is always observed (the `primary` feature)."""
    n, H = history.shape
    Z, E = tables.init.shape
    scale = np.zeros(n)

    def observe(alpha: np.ndarray, j: int) -> np.ndarray:
        m = len(alpha)
        h = history[:m, j] if j < H else np.zeros(m, dtype=np.int64)
        h = np.where(layer[:m] == j, primary[:m] + 1, h)
        seen = np.flatnonzero(h > 0)
        mask = np.ones((m, E))
        mask[seen] = 0.0
        mask[seen, h[seen] - 1] = 1.0
        alpha = alpha.reshape(m, Z, E) * mask[:, None, :]
        total = alpha.sum(axis=(1, 2))
        scale[:m] += np.log(total)
        return (alpha / total[:, None, None]).reshape(m, Z * E)

    alpha = observe(np.broadcast_to(tables.init.reshape(1, Z * E), (n, Z * E)).copy(), 0)
    for j in range(int(layer[0])):  # rows are sorted by layer, highest first
        m = int(np.searchsorted(-layer, -j, side="left"))  # rows with layer > j: a prefix
        if m == 0:
            break
        alpha[:m] = observe(alpha[:m] @ tables.block_trans(j), j + 1)
    alpha = alpha.reshape(n, Z, E)
    with np.errstate(divide="ignore"):
        ll = np.log(alpha[np.arange(n), :, primary]) + scale[:, None]  # only e_l = primary survives
    return _add_secondary(tables, ll, layer, primary, secondary)


def _add_secondary(tables: _Tables, ll: np.ndarray, layer, primary, secondary) -> np.ndarray:
    has = secondary >= 0
    ll[has] += tables.log_second[layer[has], primary[has], secondary[has]]
    return ll


def _secondaries_prob(second: np.ndarray, layer: np.ndarray, primary: np.ndarray, secondaries: np.ndarray
                      ) -> np.ndarray:
    """P(the secondaries drawn in order, without replacement | z, layer, primary): [n, Z]."""
    n = len(layer)
    out = np.ones((n, second.shape[0]))
    taken = np.zeros((n, second.shape[0]))
    for i in range(secondaries.shape[1]):
        p = second[:, layer, primary, secondaries[:, i]].T  # [n, Z]
        out *= p / np.maximum(1.0 - taken, 1e-300)
        taken += p
    return out


def _predict(tables: _Tables, router: SyntheticRouter, ll: np.ndarray, layer, primary, token_pos,
             fresh_prior, marginal, prev, target: str) -> np.ndarray:
    """Combine a [n, Z] own-observation log-likelihood with the type priors (and the previous
    token's experts when given) into P(target | features): [n, E]."""
    n = len(layer)
    rho = router.params.route_persistence
    ahead = tables.ahead[np.minimum(layer, len(tables.ahead) - 1), primary]  # [n, Z, E]
    la = router.params.num_layers - len(tables.ahead)
    per_type = ahead if target == "primary" or router.params.top_k == 1 else _inclusion(tables, ahead, layer + la)
    with np.errstate(divide="ignore"):
        log_m = np.log(marginal[token_pos])
    shift = ll.max(axis=1, keepdims=True)
    known = np.zeros(n, dtype=bool) if prev is None else (prev[:, 0] >= 0) & (token_pos > 0)
    # Without the previous token's experts: its type prior is the marginal m_t.
    w = np.exp(ll + log_m - shift)
    out = np.einsum("nz,nze->ne", w, per_type) / w.sum(axis=1, keepdims=True)
    if known.any():
        r = np.flatnonzero(known)
        a, tl = prev[r, 0], layer[r] + la
        like_prev = tables.primary_marginal[:, tl, a].T * _secondaries_prob(tables.second, tl, a, prev[r, 1:])
        fresh = np.exp(ll[r] - shift[r]) * fresh_prior[token_pos[r]]  # [n, Z]
        lam = (marginal[token_pos[r] - 1] * like_prev).sum(axis=1, keepdims=True)  # P(prev obs), fresh branch
        fresh_mass = (1 - rho) * fresh * lam
        repeat = rho * np.exp(ll[r] - shift[r]) * marginal[token_pos[r] - 1] * ahead[r, :, a] * \
            _secondaries_prob(tables.second, tl, a, prev[r, 1:])  # [n, Z]
        numer = np.einsum("nz,nze->ne", fresh_mass, per_type[r])
        copied = np.zeros((len(r), ahead.shape[2]))
        if target == "primary":
            copied[np.arange(len(r)), a] = 1.0
        else:
            copied[np.arange(len(r))[:, None], prev[r]] = 1.0
        numer += repeat.sum(axis=1, keepdims=True) * copied
        out[r] = numer / (fresh_mass.sum(axis=1) + repeat.sum(axis=1))[:, None]
    return out


def _inclusion(tables: _Tables, ahead: np.ndarray, target_layer: np.ndarray) -> np.ndarray:
    """P(e in the top-k at the target layer | z, e_l) from the primary's distribution `ahead`
    [n, Z, E]: the primary plus the first secondary (exact for top_k <= 2)."""
    second = tables.second[:, target_layer].transpose(1, 0, 2, 3)  # [n, Z, E(primary), E(secondary)]
    return ahead + np.einsum("nza,nzab->nzb", ahead, second)
