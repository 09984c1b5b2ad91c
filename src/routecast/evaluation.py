"""Score predictors on the test split: top-1, top-2, set recall, exact set, per layer."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from routecast.features import Features
from routecast.model import RoutePredictor, predict_logits
from routecast.training import inputs_for

log = logging.getLogger(__name__)


@dataclass
class ModelScorer:
    """A trained MLP as a predictor (fit is a no-op: it was trained by train_full)."""

    name: str
    model: RoutePredictor
    batch_size: int = 8192

    def fit(self, train: Features) -> ModelScorer:
        return self

    def scores(self, test: Features) -> np.ndarray:
        logits = predict_logits(self.model, inputs_for(self.model, test), self.batch_size)
        return torch.softmax(logits, dim=1).numpy()


def ranked(scores: np.ndarray, k: int) -> np.ndarray:
    """The k best experts per row, best first; ties go to the lower expert id (stable)."""
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def score_metrics(scores: np.ndarray, test: Features) -> dict[str, float]:
    """top1, top2: the true primary among the best 1/2; set_recall: share of the true top-k set
    among the predicted top-k; exact_set: predicted top-k set equals the true one."""
    k = test.meta.top_k
    if scores.shape != (len(test), test.meta.num_experts):
        raise ValueError(f"scores must be [{len(test)}, {test.meta.num_experts}], got {list(scores.shape)}")
    best = ranked(scores, max(k, 2))
    target = test.target.astype(np.int64)[:, None]
    pred_set = best[:, :k]
    true_set = test.target_set.astype(np.int64)
    overlap = (pred_set[:, :, None] == true_set[:, None, :]).any(axis=2).sum(axis=1)
    return {
        "top1": float((best[:, 0:1] == target).any(axis=1).mean()),
        "top2": float((best[:, :2] == target).any(axis=1).mean()),
        "set_recall": float((overlap / k).mean()),
        "exact_set": float((overlap == k).mean()),
        "n_test": int(len(test)),
    }


def per_layer_top2(scores: np.ndarray, test: Features) -> dict[int, float]:
    hits = (ranked(scores, 2) == test.target.astype(np.int64)[:, None]).any(axis=1)
    layers = test.layer.astype(np.int64)
    return {int(layer): float(hits[layers == layer].mean()) for layer in np.unique(layers)}
