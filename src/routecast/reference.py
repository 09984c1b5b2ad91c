"""Reference predictors: the baselines every run is scored against.

A predictor is fitted on the train split and returns a score per expert for every test sample
(higher = more likely the next layer's primary); `evaluation` turns scores into metrics.

    frequency        per-layer frequency of the target
    lookup_1..3      the published lookup ladder: (layer, e), (layer, e-1, e), (layer, e-2, e-1, e),
                     each backing off to the shorter context for a key never seen in train
    boosted_trees    gradient-boosted trees on the raw ids (the published XGBoost baseline)
    oracle           the exact Bayes-optimal predictor (synthetic traces only; `routecast.oracle`)
    speculative_gate the next layer's router on this layer's hidden state (when traces carry it)

`reference_predictors(trace_meta, train)` returns all that apply, fitted.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

import numpy as np

from routecast.features import Features
from routecast.traces import TraceMeta

log = logging.getLogger(__name__)


class Predictor(Protocol):
    name: str

    def fit(self, train: Features) -> Predictor: ...

    def scores(self, test: Features) -> np.ndarray:
        """[N, num_experts] float scores for the next layer's primary expert."""
        ...


class FrequencyPredictor:
    """Per-layer frequency: the experts most often primary at layer l + lookahead in train."""

    name = "frequency"

    def fit(self, train: Features) -> FrequencyPredictor:
        L, E = train.meta.num_layers, train.meta.num_experts
        counts = np.zeros((L, E))
        np.add.at(counts, (train.layer.astype(np.int64), train.target.astype(np.int64)), 1)
        # A layer with no train sample falls back to the global frequency.
        overall = counts.sum(axis=0, keepdims=True) + 1e-9
        counts = np.where(counts.sum(axis=1, keepdims=True) > 0, counts, overall)
        self.table = counts / counts.sum(axis=1, keepdims=True)
        return self

    def scores(self, test: Features) -> np.ndarray:
        return self.table[test.layer.astype(np.int64)]


# Pseudo-count pulling a lookup row towards its backoff: small enough that ranking is by the
# counts of the longest seen context first, ties broken by the shorter context, and an unseen
# key gets exactly the backoff distribution. The scores stay probabilities (rows sum to 1).
_BACKOFF_PSEUDO_COUNT = 1e-3


class LookupPredictor:
    """Lookup table on (layer, primary experts at layers l-order+1 .. l) fitted on train.

    `order=1` is (layer, e), `order=2` (layer, e-1, e), `order=3` (layer, e-2, e-1, e). A key never
    seen in train backs off to order-1, down to the per-layer frequency. Experts before layer 0 (or
    missing from the history) are the padding id 0, so they are simply part of the key.
    """

    def __init__(self, order: int = 1) -> None:
        if order < 1:
            raise ValueError(f"lookup order must be >= 1, got {order}")
        self.order = order
        self.name = f"lookup_{order}"

    def fit(self, train: Features) -> LookupPredictor:
        E = train.meta.num_experts
        keys = _context_keys(train, self.order)
        # Sparse counts: one row per key seen in train (the dense table is L * (E+1)^order * E).
        pairs, counts = np.unique(keys * E + train.target.astype(np.int64), return_counts=True)
        self.keys = np.unique(pairs // E)
        self.counts = np.zeros((len(self.keys), E))
        self.counts[np.searchsorted(self.keys, pairs // E), pairs % E] = counts
        self.backoff = (LookupPredictor(self.order - 1) if self.order > 1 else FrequencyPredictor()).fit(train)
        return self

    def scores(self, test: Features) -> np.ndarray:
        backoff = self.backoff.scores(test)
        keys = _context_keys(test, self.order)
        row = np.minimum(np.searchsorted(self.keys, keys), max(len(self.keys) - 1, 0))
        seen = (self.keys[row] == keys) if len(self.keys) else np.zeros(len(keys), dtype=bool)
        counts = np.where(seen[:, None], self.counts[row] if len(self.keys) else 0.0, 0.0)
        total = counts.sum(axis=1, keepdims=True)
        return (counts + _BACKOFF_PSEUDO_COUNT * backoff) / (total + _BACKOFF_PSEUDO_COUNT)


def lookup_ladder(max_order: int = 3) -> list[LookupPredictor]:
    return [LookupPredictor(order) for order in range(1, max_order + 1)]


def _expert_at(feats: Features, offset: int) -> np.ndarray:
    """The primary expert at layer l - offset, +1 (0 before layer 0, or missing / truncated history)."""
    layer = feats.layer.astype(np.int64) - offset
    H = feats.history.shape[1]
    inside = (layer >= 0) & (layer < H)
    out = np.zeros(len(feats), dtype=np.int64)
    out[inside] = feats.history[np.flatnonzero(inside), layer[inside]]
    return out


def _current_expert(feats: Features) -> np.ndarray:
    """The primary expert at layer l, +1 (0 when its history entry is missing or truncated)."""
    return _expert_at(feats, 0)


def _context_keys(feats: Features, order: int) -> np.ndarray:
    """One int64 per sample encoding (layer, e_{l-order+1}+1, ..., e_l+1)."""
    base = feats.meta.num_experts + 1
    keys = feats.layer.astype(np.int64)
    for offset in range(order - 1, -1, -1):
        keys = keys * base + _expert_at(feats, offset)
    return keys


class BoostedTreesPredictor:
    """Gradient-boosted trees on the raw ids (layer, e-1, e, secondary as categorical features):
    the published XGBoost baseline, with scikit-learn's HistGradientBoostingClassifier.

    The four ids take few distinct values, so identical (features, target) rows are merged into
    one row weighted by its count: the same loss as on every row, on a few percent of them.
    Training is capped (`max_train_rows` sampled rows before merging, `max_iter` boosting rounds,
    early stopping on a 10% hold-out) so it fits in well under 30 s on 2 cores at the default size.
    It runs on `threads` OpenMP threads (default 1): on a busy machine OpenMP's spinning barriers
    make several threads many times slower than one, and merged rows leave little to share.
    """

    name = "boosted_trees"

    def __init__(self, max_train_rows: int = 2_000_000, max_iter: int = 80, learning_rate: float = 0.25,
                 max_leaf_nodes: int = 31, threads: int | None = 1, seed: int = 0) -> None:
        self.max_train_rows = max_train_rows
        self.max_iter = max_iter
        self.learning_rate = learning_rate
        self.max_leaf_nodes = max_leaf_nodes
        self.threads = threads  # None: every core
        self.seed = seed

    @staticmethod
    def _design(feats: Features) -> np.ndarray:
        # Missing ids (padding, k = 1) are their own category 0: sklearn wants categories >= 0.
        return np.column_stack([
            feats.layer.astype(np.int64),
            _expert_at(feats, 1),
            _expert_at(feats, 0),
            feats.secondary.astype(np.int64) + 1,
        ])

    def fit(self, train: Features) -> BoostedTreesPredictor:
        from sklearn.ensemble import HistGradientBoostingClassifier
        from threadpoolctl import threadpool_limits

        start = time.perf_counter()
        self.num_experts = E = train.meta.num_experts
        rows = np.arange(len(train))
        if len(rows) > self.max_train_rows:
            rows = np.sort(np.random.default_rng(self.seed).choice(rows, self.max_train_rows, replace=False))
        X, y = self._design(train)[rows], train.target.astype(np.int64)[rows]
        radix = [train.meta.num_layers, E + 1, E + 1, E + 1, E]  # each column's range
        # Early stopping watches the loss on held-out sequences (10%), merged the same way.
        seqs = np.unique(train.seq_id[rows])
        held = np.random.default_rng(self.seed).permutation(seqs)[: len(seqs) // 10]
        is_val = np.isin(train.seq_id[rows], held)
        X_fit, y_fit, w_fit = _merge_rows(X[~is_val], y[~is_val], radix)
        X_val, y_val, w_val = _merge_rows(X[is_val], y[is_val], radix)
        self.classes = np.unique(y_fit)
        if len(self.classes) < 2:  # a degenerate train split: predict its one expert
            self.model = None
        else:
            early = len(held) > 0 and bool(np.isin(y_val, self.classes).all())
            self.model = HistGradientBoostingClassifier(
                categorical_features=[0, 1, 2, 3], max_iter=self.max_iter, learning_rate=self.learning_rate,
                max_leaf_nodes=self.max_leaf_nodes, early_stopping=early, n_iter_no_change=5,
                random_state=self.seed,
            )
            val = dict(X_val=X_val, y_val=y_val, sample_weight_val=w_val) if early else {}
            with threadpool_limits(limits=self.threads, user_api="openmp"):
                self.model.fit(X_fit, y_fit, sample_weight=w_fit, **val)
        log.info("boosted_trees: %d rows (%d distinct) in %.1fs, %s rounds", len(y), len(y_fit) + len(y_val),
                 time.perf_counter() - start, getattr(self.model, "n_iter_", 0))
        return self

    def scores(self, test: Features) -> np.ndarray:
        out = np.zeros((len(test), self.num_experts))
        if self.model is None:
            out[:, self.classes] = 1.0
        elif len(test):
            from threadpoolctl import threadpool_limits

            with threadpool_limits(limits=self.threads, user_api="openmp"):
                out[:, self.model.classes_] = self.model.predict_proba(self._design(test).astype(np.float64))
        return out


def _merge_rows(X: np.ndarray, y: np.ndarray, radix: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct rows of (X, y) and their counts (as float sample weights); column c lies in [0, radix[c])."""
    key = np.zeros(len(y), dtype=np.int64)
    for col, base in zip([*X.T, y], radix):
        key = key * base + col
    key, count = np.unique(key, return_counts=True)
    digits = []
    for base in radix[::-1]:
        key, digit = np.divmod(key, base)
        digits.append(digit)
    return np.column_stack(digits[:0:-1]).astype(np.float64), digits[0], count.astype(np.float64)


class SpeculativeGatePredictor:
    """Score = the next layer's router logits applied to this layer's hidden state (`spec_logits`)."""

    name = "speculative_gate"

    def fit(self, train: Features) -> SpeculativeGatePredictor:
        return self

    def scores(self, test: Features) -> np.ndarray:
        if test.spec_logits is None:
            raise ValueError("speculative_gate: the features carry no spec_logits column")
        return np.asarray(test.spec_logits, dtype=np.float64)


def reference_predictors(trace_meta: TraceMeta, train: Features) -> list[Predictor]:
    """Every reference predictor that applies to this trace, fitted on `train`.

    Always: frequency, lookup_1..3, boosted_trees. The oracle only for synthetic traces (it is
    rebuilt from `trace_meta.source_params`); the speculative gate only when `train` carries
    `spec_logits`.
    """
    predictors: list[Predictor] = [FrequencyPredictor(), *lookup_ladder(3), BoostedTreesPredictor()]
    if trace_meta.source == "synthetic":
        from routecast.oracle import OraclePredictor

        predictors.append(OraclePredictor.from_trace_meta(trace_meta))
    if train.spec_logits is not None:
        predictors.append(SpeculativeGatePredictor())
    fitted = []
    for predictor in predictors:
        start = time.perf_counter()
        fitted.append(predictor.fit(train))
        log.info("reference %s: fitted in %.1fs", predictor.name, time.perf_counter() - start)
    return fitted
