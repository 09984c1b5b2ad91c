"""Reference predictors: the baselines every run is scored against.

A predictor is fitted on the training samples and returns a score per expert for every test
sample: `scores` rank the next layer's primary expert, `set_scores` (where a predictor has them)
rank membership of the next layer's top-k set. `evaluation` turns scores into metrics.

    frequency        per-layer frequency of the target
    lookup_1..3      the published lookup ladder: (layer, e), (layer, e-1, e), (layer, e-2, e-1, e),
                     each backing off to the shorter context for a key never seen in train
    boosted_trees    gradient-boosted trees on the raw ids (the published XGBoost baseline)
    boosted_trees_full  gradient-boosted trees on the features the models read: layer, both experts,
                     gate weights, the whole expert history and position (a strong reference that is
                     not a neural network)
    set_lookup       for a trace of unordered sets: each expert of layer l's set votes for the
                     experts that followed it at layer l + lookahead in train (co-occurrence)
    token_table      the token's own table, (token, layer) -> next set, backing off to set_lookup
                     (or lookup_1) for a token seen fewer than `min_count` times (features.token)
    oracle           the exact Bayes-optimal predictor (synthetic traces only; `routecast.predictors.oracle`)
    speculative_gate the next layer's router on this layer's hidden state (when traces carry it)

`routecast.evaluate.evaluation.reference_predictors(trace_meta, train)` returns all that apply, fitted.

Membership contract (`routecast.evaluate.scoring`): set scores are expected to be memberships,
P(e in the next set), a row summing to about k; the threshold metrics (`macro_f1_p50`, predicted
set = memberships >= 0.5) read them. frequency's and lookup's set tables are normalised set counts
(rows sum to 1): evaluation multiplies them by k, which changes no ranking, so every top-k figure
is the same either way. A predictor whose set scores already sum to k is taken as it is.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

import numpy as np

from routecast.data.features import Features

log = logging.getLogger(__name__)


class ReferencePredictor(Protocol):
    name: str

    def fit(self, train: Features) -> ReferencePredictor: ...

    def scores(self, test: Features) -> np.ndarray:
        """[N, num_experts] float scores for the next layer's primary expert."""
        ...


def _targets(feats: Features, which: str) -> np.ndarray:
    """The experts a sample counts towards: [N, 1] its next primary, or [N, k] its next top-k set."""
    return (feats.target[:, None] if which == "primary" else feats.target_set).astype(np.int64)


def _count(row: np.ndarray, n_rows: int, targets: np.ndarray, num_experts: int) -> np.ndarray:
    """counts[r, e] = how many (sample, listed expert) pairs have row r and expert e: [n_rows, E]."""
    cell = (row[:, None] * num_experts + targets).ravel()
    return np.bincount(cell, minlength=n_rows * num_experts).reshape(n_rows, num_experts).astype(np.float64)


class FrequencyPredictor:
    """Per-layer frequency: the experts most often primary at layer l + lookahead in train."""

    name = "frequency"

    def fit(self, train: Features) -> FrequencyPredictor:
        self.table = _layer_frequency(train, _targets(train, "primary"))
        self.set_table = _layer_frequency(train, _targets(train, "set"))
        return self

    def scores(self, test: Features) -> np.ndarray:
        return self.table[test.layer.astype(np.int64)]

    def set_scores(self, test: Features) -> np.ndarray:
        return self.set_table[test.layer.astype(np.int64)]


def _layer_frequency(train: Features, targets: np.ndarray) -> np.ndarray:
    """Per-layer frequency [L, E] of `targets`; a layer with no sample takes the global one."""
    counts = _count(train.layer.astype(np.int64), train.meta.num_layers, targets, train.meta.num_experts)
    overall = counts.sum(axis=0, keepdims=True) + 1e-9
    counts = np.where(counts.sum(axis=1, keepdims=True) > 0, counts, overall)
    return counts / counts.sum(axis=1, keepdims=True)


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
        keys = context_keys(train, self.order)
        # Sparse counts: one row per key seen in train (the dense table is L * (E+1)^order * E).
        E = train.meta.num_experts
        self.keys, row = np.unique(keys, return_inverse=True)
        self.counts = _count(row, len(self.keys), _targets(train, "primary"), E)
        self.set_counts = _count(row, len(self.keys), _targets(train, "set"), E)
        self.backoff = (LookupPredictor(self.order - 1) if self.order > 1 else FrequencyPredictor()).fit(train)
        return self

    def scores(self, test: Features) -> np.ndarray:
        return _backed_off(self.keys, self.counts, context_keys(test, self.order), self.backoff.scores(test))

    def set_scores(self, test: Features) -> np.ndarray:
        return _backed_off(self.keys, self.set_counts, context_keys(test, self.order), self.backoff.set_scores(test))


def _backed_off(keys: np.ndarray, counts: np.ndarray, query: np.ndarray, backoff: np.ndarray) -> np.ndarray:
    """A seen key's counts pulled towards `backoff` by the pseudo-count; an unseen key gets `backoff`."""
    if len(keys) == 0:
        return backoff
    row = np.minimum(np.searchsorted(keys, query), len(keys) - 1)
    found = counts[row]
    found[keys[row] != query] = 0.0
    total = found.sum(axis=1, keepdims=True) + _BACKOFF_PSEUDO_COUNT
    found += _BACKOFF_PSEUDO_COUNT * backoff  # in place: [N, E] float64 is large at 64 experts
    found /= total
    return found


def lookup_ladder(max_order: int = 3) -> list[LookupPredictor]:
    return [LookupPredictor(order) for order in range(1, max_order + 1)]


def lookup_tables(train: Features, target: str = "primary", max_order: int = 3):
    """The ladder's fitted counts as tensors for `routecast.predictors.neural.LookupMLP.set_tables`:
    (per-layer frequency [L, E], [keys per order], [counts per order])."""
    import torch

    table = LookupPredictor(max_order).fit(train)
    ladder = [table]
    while isinstance(ladder[-1].backoff, LookupPredictor):
        ladder.append(ladder[-1].backoff)
    ladder.reverse()  # order 1 first
    pick = "counts" if target == "primary" else "set_counts"
    frequency = ladder[0].backoff.table if target == "primary" else ladder[0].backoff.set_table
    return (torch.from_numpy(frequency), [torch.from_numpy(p.keys) for p in ladder],
            [torch.from_numpy(getattr(p, pick)) for p in ladder])


def cross_fitted_lookup_scores(train: Features, target: str = "primary", folds: int = 5, seed: int = 0,
                               max_order: int = 3, log: bool = False) -> np.ndarray:
    """The ladder's scores for every training sample from tables fitted on the other folds of
    sequences (so a sample's own sequence never counts towards its score): [N, E] float64.

    `log`: their logarithms (floored at 1e-12) as float32 instead, taken fold by fold, so the
    float64 scores of all samples never exist at once (the `lookup_mlp` input: a quarter of the
    memory at 64 experts)."""
    sequences = np.unique(train.seq_id)
    fold_of = np.random.default_rng(seed).permutation(len(sequences)) % min(folds, len(sequences))
    sample_fold = fold_of[np.searchsorted(sequences, train.seq_id)]
    out = np.empty((len(train), train.meta.num_experts), dtype=np.float32 if log else np.float64)
    for fold in np.unique(sample_fold):
        inside = sample_fold == fold
        table = LookupPredictor(max_order).fit(train.take(~inside)) if (~inside).any() else None
        rows = np.flatnonzero(inside)
        for start in range(0, len(rows), _SCORE_CHUNK):  # in chunks: the scores' temporaries stay small
            chunk = rows[start:start + _SCORE_CHUNK]
            if table is None:
                scores = np.full((len(chunk), train.meta.num_experts), 1.0 / train.meta.num_experts)
            else:
                part = train.take(chunk)
                scores = table.scores(part) if target == "primary" else table.set_scores(part)
            out[chunk] = np.log(np.maximum(scores, 1e-12)) if log else scores
    return out


_SCORE_CHUNK = 1 << 16  # samples scored at once by cross_fitted_lookup_scores


def _expert_at(feats: Features, offset: int) -> np.ndarray:
    """The primary expert at layer l - offset, +1 (0 before layer 0, or missing / truncated history).
    Layer l's own primary is always known (the `primary` feature)."""
    if offset == 0:
        return feats.primary.astype(np.int64) + 1
    layer = feats.layer.astype(np.int64) - offset
    H = feats.history.shape[1]
    inside = (layer >= 0) & (layer < H)
    out = np.zeros(len(feats), dtype=np.int64)
    out[inside] = feats.history[np.flatnonzero(inside), layer[inside]]
    return out


def context_keys(feats: Features, order: int) -> np.ndarray:
    """One int64 per sample encoding (layer, e_{l-order+1}+1, ..., e_l+1)."""
    base = feats.meta.num_experts + 1
    keys = feats.layer.astype(np.int64)
    for offset in range(order - 1, -1, -1):
        keys = keys * base + _expert_at(feats, offset)
    return keys


_MAX_CATEGORIES = 255  # scikit-learn's HistGradientBoosting limit (max_bins)


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
    merge_rows = True  # identical rows merged into one weighted row (the raw ids repeat a lot)

    def __init__(self, max_train_rows: int = 2_000_000, max_iter: int = 80, learning_rate: float = 0.25,
                 max_leaf_nodes: int = 31, threads: int | None = 1, seed: int = 0) -> None:
        self.max_train_rows = max_train_rows
        self.max_iter = max_iter
        self.learning_rate = learning_rate
        self.max_leaf_nodes = max_leaf_nodes
        self.threads = threads  # None: every core
        self.seed = seed

    def _columns(self, feats: Features) -> tuple[np.ndarray, list[int | None]]:
        """The design matrix (int64 ids, then any real-valued columns) and each column's range
        (the number of categories of an id column, None for a real-valued one)."""
        # Missing ids (padding, k = 1) are their own category 0: sklearn wants categories >= 0.
        E, L = feats.meta.num_experts, feats.meta.num_layers
        X = np.column_stack([
            feats.layer.astype(np.int64),
            _expert_at(feats, 1),
            _expert_at(feats, 0),
            feats.secondary.astype(np.int64) + 1,
        ])
        return X, [L, E + 1, E + 1, E + 1]

    def fit(self, train: Features) -> BoostedTreesPredictor:
        from sklearn.ensemble import HistGradientBoostingClassifier
        from threadpoolctl import threadpool_limits

        start = time.perf_counter()
        self.num_experts = E = train.meta.num_experts
        rows = np.arange(len(train))
        if len(rows) > self.max_train_rows:
            rows = np.sort(np.random.default_rng(self.seed).choice(rows, self.max_train_rows, replace=False))
        X, ranges = self._columns(train.take(rows))
        y = train.target.astype(np.int64)[rows]
        # Early stopping watches the loss on held-out sequences (10%), merged the same way.
        seqs = np.unique(train.seq_id[rows])
        held = np.random.default_rng(self.seed).permutation(seqs)[: len(seqs) // 10]
        is_val = np.isin(train.seq_id[rows], held)
        if self.merge_rows:
            radix = [*ranges, E]
            X_fit, y_fit, w_fit = _merge_rows(X[~is_val], y[~is_val], radix)
            X_val, y_val, w_val = _merge_rows(X[is_val], y[is_val], radix)
        else:
            X_fit, y_fit = X[~is_val].astype(np.float64), y[~is_val]
            X_val, y_val = X[is_val].astype(np.float64), y[is_val]
            w_fit, w_val = np.ones(len(y_fit)), np.ones(len(y_val))
        self.classes = np.unique(y_fit)
        if len(self.classes) < 2:  # a degenerate train split: predict its one expert
            self.model = None
        else:
            early = len(held) > 0 and bool(np.isin(y_val, self.classes).all())
            # scikit-learn bins a categorical feature into at most 255 categories: a column with more
            # (over 254 experts, or 255 layers) is given as an ordinal number instead.
            categorical = np.array([r is not None and r <= _MAX_CATEGORIES for r in ranges])
            ids = np.array([r is not None for r in ranges])
            if (ids & ~categorical).any():
                log.info("%s: %d experts / %d layers exceed scikit-learn's %d categories; those ids enter as "
                         "ordinal numbers", self.name, E, train.meta.num_layers, _MAX_CATEGORIES)
            self.model = HistGradientBoostingClassifier(
                categorical_features=categorical if categorical.any() else None, max_iter=self.max_iter,
                learning_rate=self.learning_rate, max_leaf_nodes=self.max_leaf_nodes, early_stopping=early,
                n_iter_no_change=5, random_state=self.seed,
            )
            val = dict(X_val=X_val, y_val=y_val, sample_weight_val=w_val) if early else {}
            with threadpool_limits(limits=self.threads, user_api="openmp"):
                self.model.fit(X_fit, y_fit, sample_weight=w_fit, **val)
        log.info("%s: %d rows (%d distinct) in %.1fs, %s rounds", self.name, len(y), len(y_fit) + len(y_val),
                 time.perf_counter() - start, getattr(self.model, "n_iter_", 0))
        return self

    def scores(self, test: Features) -> np.ndarray:
        out = np.zeros((len(test), self.num_experts))
        if self.model is None:
            out[:, self.classes] = 1.0
        elif len(test):
            from threadpoolctl import threadpool_limits

            with threadpool_limits(limits=self.threads, user_api="openmp"):
                for start in range(0, len(test), _SCORE_CHUNK):  # the design matrix is wide: in chunks
                    part = test.take(np.arange(start, min(start + _SCORE_CHUNK, len(test))))
                    X = self._columns(part)[0].astype(np.float64)
                    out[start:start + len(part), self.model.classes_] = self.model.predict_proba(X)
        return out


class BoostedTreesFullPredictor(BoostedTreesPredictor):
    """Gradient-boosted trees on the features the learned kinds read: the layer, this layer's
    primary and secondary expert and the expert history (entry j = layer j's primary) as
    categorical columns, then the gate weights and the position as numbers. A strong reference
    that is not a neural network: a token's path through the earlier layers identifies it well
    on a real model, which `boosted_trees` (the last two ids only) cannot see.

    Rows no longer repeat, so none are merged: training reads `max_train_rows` sampled rows
    (100,000; about 10 s at 8 experts and 45 s at 64 experts on one core here), at learning rate
    0.1 (at 0.25 its 64-class fit diverged on the FLAME log), with early stopping on held-out
    sequences.
    """

    name = "boosted_trees_full"
    merge_rows = False

    def __init__(self, max_train_rows: int = 100_000, max_iter: int = 60, learning_rate: float = 0.1,
                 max_leaf_nodes: int = 31, threads: int | None = 1, seed: int = 0) -> None:
        super().__init__(max_train_rows, max_iter, learning_rate, max_leaf_nodes, threads, seed)

    def _columns(self, feats: Features) -> tuple[np.ndarray, list[int | None]]:
        E, L, H = feats.meta.num_experts, feats.meta.num_layers, feats.history.shape[1]
        k = feats.gating.shape[1]
        X = np.column_stack([
            feats.layer.astype(np.float64),
            feats.primary.astype(np.float64) + 1,
            feats.secondary.astype(np.float64) + 1,
            feats.history.astype(np.float64),  # already +1 (0: padding, a later or missing layer)
            feats.gating.astype(np.float64),
            feats.position.astype(np.float64),
        ])
        return X, [L, E + 1, E + 1, *[E + 1] * H, *[None] * (k + 1)]


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


def _set_cooccurrence(train: Features) -> np.ndarray:
    """P(e' in the set at l + lookahead | e in the set at l), per layer: [slots, E, E] (a row of an
    expert never seen at a layer is the layer's frequency)."""
    meta = train.meta
    E, S = meta.num_experts, meta.num_layers - meta.lookahead
    layer = train.layer.astype(np.int64)
    current, target = train.current_set.astype(np.int64), train.target_set.astype(np.int64)
    counts = np.zeros(S * E * E, dtype=np.float64)
    for i in range(current.shape[1]):  # one slot of the current set at a time: bounded memory
        cell = ((layer * E + current[:, i])[:, None] * E + target).ravel()
        counts += np.bincount(cell, minlength=S * E * E)
    counts = counts.reshape(S, E, E)
    seen = np.zeros((S, E))
    np.add.at(seen, (layer[:, None], current), 1.0)
    frequency = _count(layer, S, target, E)
    frequency /= np.maximum(np.bincount(layer, minlength=S)[:, None], 1)
    return np.where(seen[:, :, None] > 0, counts / np.maximum(seen[:, :, None], 1), frequency[:, None, :])


class SetLookupPredictor:
    """Co-occurrence table for unordered sets: an expert's membership at layer l + lookahead is the
    mean over the k experts of layer l of P(e' next | e now). Scores are memberships (sum to k)."""

    name = "set_lookup"

    def fit(self, train: Features) -> SetLookupPredictor:
        if train.current_set is None:
            raise ValueError("set_lookup: the features carry no current_set column (re-encode them)")
        self.table = _set_cooccurrence(train)
        return self

    def scores(self, test: Features) -> np.ndarray:
        out = np.zeros((len(test), self.table.shape[2]))
        layer = test.layer.astype(np.int64)
        current = test.current_set.astype(np.int64)
        for i in range(current.shape[1]):
            out += self.table[layer, current[:, i]]
        return out / current.shape[1]

    set_scores = scores


class TokenTablePredictor:
    """(token, layer l) -> the experts of layer l + lookahead, counted in train: memberships
    pulled towards a backoff predictor by `prior` pseudo-samples; a token seen in fewer than
    `min_count` samples of a layer takes the backoff's scores."""

    name = "token_table"

    def __init__(self, backoff: ReferencePredictor, prior: float = 1.0, min_count: int = 1) -> None:
        self.backoff, self.prior, self.min_count = backoff, prior, min_count

    def _keys(self, feats: Features) -> np.ndarray:
        index = np.searchsorted(self.tokens, feats.token)
        index = np.minimum(index, max(len(self.tokens) - 1, 0))
        known = (self.tokens[index] == feats.token) if len(self.tokens) else np.zeros(len(feats), dtype=bool)
        return np.where(known, index * self.slots + feats.layer.astype(np.int64), -1)

    def fit(self, train: Features) -> TokenTablePredictor:
        if train.token is None:
            raise ValueError("token_table: the features carry no token column (features.token: true)")
        meta = train.meta
        self.backoff.fit(train)
        self.slots = meta.num_layers - meta.lookahead
        self.tokens = np.unique(train.token)
        keys = self._keys(train)
        self.keys, row = np.unique(keys, return_inverse=True)
        E = meta.num_experts
        which = "primary" if meta.weighted else "set"
        self.counts = _count(row, len(self.keys), _targets(train, which), E).astype(np.float32)
        self.n = np.bincount(row, minlength=len(self.keys)).astype(np.float32)
        self.set_valued = which == "set"
        return self

    def scores(self, test: Features) -> np.ndarray:
        backoff = self.backoff.set_scores(test) if self.set_valued else self.backoff.scores(test)
        keys = self._keys(test)
        row = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        seen = (self.keys[row] == keys) & (keys >= 0) & (self.n[row] >= self.min_count)
        out = np.array(backoff, dtype=np.float64)
        r = row[seen]
        out[seen] = (self.counts[r] + self.prior * backoff[seen]) / (self.n[r, None] + self.prior)
        return out

    set_scores = scores


class SpeculativeGatePredictor:
    """Score = the next layer's router logits applied to this layer's hidden state (`spec_logits`)."""

    name = "speculative_gate"

    def fit(self, train: Features) -> SpeculativeGatePredictor:
        return self

    def scores(self, test: Features) -> np.ndarray:
        if test.spec_logits is None:
            raise ValueError("speculative_gate: the features carry no spec_logits column")
        return np.asarray(test.spec_logits, dtype=np.float64)
