"""Reference predictors: simple baselines every run is scored against.

A predictor is fitted on the train split and returns a score per expert for every test sample
(higher = more likely the next layer's primary); `evaluation` turns scores into metrics.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from routecast.features import Features


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
        self.table = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        return self

    def scores(self, test: Features) -> np.ndarray:
        return self.table[test.layer.astype(np.int64)]


class LookupPredictor:
    """(layer, current primary expert) lookup table fitted on train, backing off to the layer's
    frequency for a key never seen in train."""

    name = "lookup"

    def fit(self, train: Features) -> LookupPredictor:
        L, E = train.meta.num_layers, train.meta.num_experts
        current = _current_expert(train)
        counts = np.zeros((L, E + 1, E))
        np.add.at(counts, (train.layer.astype(np.int64), current, train.target.astype(np.int64)), 1)
        self.counts = counts
        self.backoff = FrequencyPredictor().fit(train)
        return self

    def scores(self, test: Features) -> np.ndarray:
        counts = self.counts[test.layer.astype(np.int64), _current_expert(test)]
        total = counts.sum(axis=1, keepdims=True)
        # Seen keys: relative frequency (in [0, 1]) plus 1 so they rank above any backoff score.
        seen = counts / np.maximum(total, 1) + 1.0
        return np.where(total > 0, seen, self.backoff.scores(test))


def _current_expert(feats: Features) -> np.ndarray:
    """The primary expert at layer l, +1 (0 when its history entry is missing or truncated)."""
    layer = feats.layer.astype(np.int64)
    H = feats.history.shape[1]
    inside = layer < H
    current = np.zeros(len(feats), dtype=np.int64)
    current[inside] = feats.history[np.flatnonzero(inside), layer[inside]]
    return current
