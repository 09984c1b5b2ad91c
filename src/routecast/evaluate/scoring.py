"""Per-sample hits of a predictor's scores: the one definition of every accuracy metric
(evaluation's figures, training's validation objective, the tests' checks).

    top1, top2   the true next primary among the best 1 / 2 experts of `scores`
    set_recall   share of the true next top-k set among the best k of `set_scores`
    exact_set    the best k of `set_scores` are exactly the true next top-k set

Ties go to the lower expert id everywhere, so a figure never depends on the sort's whims.
"""

from __future__ import annotations

import numpy as np

from routecast.data.features import Features


def ranked(scores: np.ndarray, k: int) -> np.ndarray:
    """The k best experts per row, best first; ties go to the lower expert id (stable)."""
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def sample_hits(scores: np.ndarray, set_scores: np.ndarray, test: Features) -> dict[str, np.ndarray]:
    """Per-sample values of each metric (their means are the metrics): float arrays [N]."""
    k, E = test.meta.top_k, test.meta.num_experts
    for s in (scores, set_scores):
        if s.shape != (len(test), E):
            raise ValueError(f"scores must be [{len(test)}, {E}], got {list(s.shape)}")
    best = ranked(scores, 2)
    target = test.target.astype(np.int64)[:, None]
    pred_set = ranked(set_scores, k)
    overlap = (pred_set[:, :, None] == test.target_set.astype(np.int64)[:, None, :]).any(axis=2).sum(axis=1)
    return {
        "top1": (best[:, 0:1] == target).any(axis=1).astype(float),
        "top2": (best[:, :2] == target).any(axis=1).astype(float),
        "set_recall": overlap / k,
        "exact_set": (overlap == k).astype(float),
    }
