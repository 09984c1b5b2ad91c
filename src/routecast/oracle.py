"""The exact Bayes-optimal predictor for synthetic traces: the accuracy ceiling of the task.

A synthetic token draws a hidden type `z` from `P(z | position)`, then walks a per-type Markov
chain over primary experts; the secondary at layer l depends on `(z, l, e_l)`; the gate weights
are independent of everything. Given exactly the model's features of a sample (layer l, the
secondary at l, the gate weights, the primaries at layers 0..l, the position), the posterior
over the type is, by Bayes,

    log P(z | features) = log P(z | pos) + log P(e_0 | z) + sum_{j<l} log P(e_{j+1} | z, j, e_j)
                          + log P(secondary_l | z, l, e_l) + const,

and the prediction for the primary at layer l + lookahead is

    P(target | features) = sum_z P(z | features) * [T_l ... T_{l+lookahead-1}](z, e_l, target).

Rows whose history is complete use that closed form in log space. Rows with a missing or
truncated history entry (real logs drop rows; `history_len` may cut the history short) run the
forward algorithm over (type, expert) instead, summing out the unseen experts, normalised each
step. Everything is vectorised over samples and processed in chunks to bound memory.

`spec_logits`, when present, are not used: they are an extra feature beyond the seed's, drawn
from the true next layer, so the speculative gate may beat this ceiling, and that is expected.
"""

from __future__ import annotations

import numpy as np

from routecast.features import Features
from routecast.params import SyntheticParams
from routecast.synthetic import POSITION_SCALE, SyntheticRouter, build_router
from routecast.traces import TraceMeta

_CHUNK = 65_536  # samples per chunk: bounds the [chunk, types, experts] temporaries to ~135 MB


class OraclePredictor:
    """Predictor-protocol wrapper: `fit` ignores train; `scores` are exact posterior probabilities."""

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
        return posterior_next_expert(self.router, test)

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
    meta = feats.meta
    p = router.params
    if (meta.num_layers, meta.num_experts) != (p.num_layers, p.num_experts):
        raise ValueError(f"features have {meta.num_layers} layers x {meta.num_experts} experts, the router "
                         f"{p.num_layers} x {p.num_experts}: not the trace this router generated")
    n, E = len(feats), p.num_experts
    out = np.empty((n, E))
    if n == 0:
        return out
    tables = _Tables(router, meta.lookahead)
    layer = feats.layer.astype(np.int64)
    history = feats.history.astype(np.int64)
    H = history.shape[1]
    # The generator's position feature, recovered from the encoder's (exact unless clipped at 1).
    position = np.minimum(feats.position.astype(np.float64) * (meta.position_scale / POSITION_SCALE), 1.0)
    secondary = feats.secondary.astype(np.int64)

    # Complete rows: every history entry 0..l observed.
    cols = np.arange(H)[None, :]
    complete = (layer < H) & ~((history == 0) & (cols <= layer[:, None])).any(axis=1)
    for rows, fn in ((np.flatnonzero(complete), _complete_rows), (np.flatnonzero(~complete), _forward_rows)):
        # Sorted by layer, highest first: the rows still walking at step j are a prefix.
        rows = rows[np.argsort(-layer[rows], kind="stable")]
        for start in range(0, len(rows), _CHUNK):
            r = rows[start:start + _CHUNK]
            out[r] = fn(tables, layer[r], history[r], secondary[r], position[r], router)
    return out


class _Tables:
    """Log tables laid out so that one gather returns a contiguous [types] vector per sample."""

    def __init__(self, router: SyntheticRouter, lookahead: int) -> None:
        L = router.params.num_layers
        with np.errstate(divide="ignore"):
            self.log_init = np.log(router.init).T.copy()  # [E, Z]
            self.log_trans = np.log(router.trans).transpose(1, 2, 3, 0).copy()  # [L-1, E, E', Z]
            self.log_second = np.log(router.second).transpose(1, 2, 3, 0).copy()  # [L, E, S, Z]
        self.trans = router.trans  # [Z, L-1, E, E']
        self.second = router.second  # [Z, L, E, S]
        # lookahead-step transition from layer l: [L - lookahead, E, Z, E'] (types before targets).
        steps = router.trans[:, 0:L - lookahead]
        for d in range(1, lookahead):
            steps = np.einsum("zlab,zlbc->zlac", steps, router.trans[:, d:L - lookahead + d])
        self.ahead = steps.transpose(1, 2, 0, 3).copy()

    def block_trans(self, j: int) -> np.ndarray:
        """Layer j's transition as one block-diagonal [Z*E, Z*E] matrix (type z's block at z*E)."""
        Z, E = self.trans.shape[0], self.trans.shape[-1]
        out = np.zeros((Z, E, Z, E))
        out[np.arange(Z), :, np.arange(Z), :] = self.trans[:, j]
        return out.reshape(Z * E, Z * E)


def _predict(tables: _Tables, log_post: np.ndarray, layer: np.ndarray, current: np.ndarray) -> np.ndarray:
    """Normalise a [n, Z] log type posterior and push it through the lookahead transition."""
    log_post = log_post - log_post.max(axis=1, keepdims=True)
    post = np.exp(log_post)
    post /= post.sum(axis=1, keepdims=True)
    ahead = tables.ahead[np.minimum(layer, len(tables.ahead) - 1), current]  # [n, Z, E]
    return np.einsum("nz,nze->ne", post, ahead)


def _complete_rows(tables: _Tables, layer, history, secondary, position, router) -> np.ndarray:
    e = history - 1  # observed experts (-1 past layer l, never read there)
    with np.errstate(divide="ignore"):
        log_post = np.log(router.type_prior(position))
    log_post += tables.log_init[e[:, 0]]
    for j in range(int(layer[0])):  # rows are sorted by layer, highest first
        m = int(np.searchsorted(-layer, -j, side="left"))  # rows with layer > j: a prefix
        if m == 0:
            break
        log_post[:m] += tables.log_trans[j, e[:m, j], e[:m, j + 1]]
    current = e[np.arange(len(layer)), layer]
    has_secondary = secondary >= 0
    log_post[has_secondary] += tables.log_second[layer[has_secondary], current[has_secondary],
                                                 secondary[has_secondary]]
    return _predict(tables, log_post, layer, current)


def _forward_rows(tables: _Tables, layer, history, secondary, position, router) -> np.ndarray:
    """Forward algorithm over (type, expert) for rows with unseen history entries.

    `alpha[i, z, e]` = P(z, e_j = e | what row i shows of layers 0..j), normalised every step
    (the scaled forward algorithm: no underflow however long the chain). One step is a product
    with the block-diagonal [Z*E, Z*E] transition of layer j: one BLAS call for all rows."""
    n, H = history.shape
    Z, E = router.init.shape

    def observe(alpha: np.ndarray, j: int) -> np.ndarray:
        m = len(alpha)
        h = history[:m, j] if j < H else np.zeros(m, dtype=np.int64)
        seen = np.flatnonzero(h > 0)
        mask = np.ones((m, E))
        mask[seen] = 0.0
        mask[seen, h[seen] - 1] = 1.0
        alpha = alpha.reshape(m, Z, E) * mask[:, None, :]
        return (alpha / alpha.sum(axis=(1, 2), keepdims=True)).reshape(m, Z * E)

    alpha = observe((router.type_prior(position)[:, :, None] * router.init[None]).reshape(n, Z * E), 0)
    for j in range(int(layer[0])):  # rows are sorted by layer, highest first
        m = int(np.searchsorted(-layer, -j, side="left"))  # rows with layer > j: a prefix
        if m == 0:
            break
        alpha[:m] = observe(alpha[:m] @ tables.block_trans(j), j + 1)
    alpha = alpha.reshape(n, Z, E)
    has_secondary = secondary >= 0
    if has_secondary.any():
        s = np.where(has_secondary, secondary, 0)
        like = tables.second[:, layer, :, s]  # advanced indices split by a slice go first: [n, Z, E]
        alpha = alpha * np.where(has_secondary[:, None, None], like, 1.0)
        alpha /= alpha.sum(axis=(1, 2), keepdims=True)
    ahead = tables.ahead[np.minimum(layer, len(tables.ahead) - 1)]  # [n, E, Z, E']
    return np.einsum("nze,nezt->nt", alpha, ahead)
