"""Per-sample hits of a predictor's scores: the one definition of every accuracy metric
(evaluation's figures, training's validation objective, the tests' checks).

    top1, top2   the true next primary among the best 1 / 2 experts of `scores`
    set_recall   share of the true next top-k set among the best k of `set_scores` (set recall at k)
    exact_set    the best k of `set_scores` are exactly the true next top-k set

Set metrics (MoE-Beyond, arXiv 2508.17137) score the next layer's set as E binary decisions,
"is expert e in it?", per sample:

    macro_f1             macro F1 over experts, the predicted set being the best k of `set_scores`
    macro_f1_p50         the same, the predicted set being every expert whose membership is >= 0.5
                         (MoE-Beyond's definition; it may hold more or fewer than k experts)
    expert_accuracy      share of (sample, expert) pairs whose membership is predicted right, with
                         the best k as the predicted set: per sample 1 - (FP + FN) / E
    expert_accuracy_p50  the same with the threshold's predicted set

F1 is not a mean of per-sample values: it is computed from true positives, false positives and
false negatives summed over the samples (`set_counts`), per expert, then averaged over experts.

Membership contract: a predictor's memberships are P(e in the next set), a row summing to about k.
`set_scores` need only rank (every top-k figure reads their order alone); the threshold figures
read memberships, which `routecast.evaluate.evaluation.memberships` derives from a predictor (its
own `memberships(test)` where it has one; a distribution over experts, rows summing to 1, times k;
logits through softmax, times k). A positive scale per row never changes a ranking, so no top-k
figure depends on it.

Ties go to the lower expert id everywhere, so a figure never depends on the sort's whims.
"""

from __future__ import annotations

import numpy as np

from routecast.data.features import Features

# Membership probability at or above which an expert is predicted in the set (MoE-Beyond).
THRESHOLD = 0.5
# set_counts' middle axis.
TP, FP, FN = 0, 1, 2


def ranked(scores: np.ndarray, k: int) -> np.ndarray:
    """The k best experts per row, best first; ties go to the lower expert id (stable). An array of
    its own: a slice of the full [N, E] argsort would keep all of it alive (at 64 experts and 218,100
    test samples, 112 MB for every ranking evaluate keeps, where the slice needs 3.5 MB a column)."""
    return np.argsort(-scores, axis=1, kind="stable")[:, :k].copy()


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


def membership_matrix(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """bool [N, E]: row n marks the experts listed in `experts[n]` ([N, m] ids)."""
    out = np.zeros((len(experts), num_experts), dtype=bool)
    out[np.arange(len(experts))[:, None], experts.astype(np.int64)] = True
    return out


def predicted_sets(set_scores: np.ndarray, memberships: np.ndarray, test: Features) -> dict[str, np.ndarray]:
    """The predicted next sets as bool [N, E]: `topk` the best k of `set_scores`, `p50` every expert
    whose membership is >= THRESHOLD."""
    k, E = test.meta.top_k, test.meta.num_experts
    for s in (set_scores, memberships):
        if s.shape != (len(test), E):
            raise ValueError(f"scores must be [{len(test)}, {E}], got {list(s.shape)}")
    return {"topk": membership_matrix(ranked(set_scores, k), E), "p50": memberships >= THRESHOLD}


def expert_accuracy(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per sample, the share of experts whose membership `pred` gets right: 1 - (FP + FN) / E, [N]."""
    return 1.0 - (pred != truth).sum(axis=1) / pred.shape[1]


def set_counts(pred: np.ndarray, truth: np.ndarray, group: np.ndarray, n_groups: int) -> np.ndarray:
    """True positives, false positives and false negatives per group and expert, summed over the
    group's samples: int64 [n_groups, 3, E] (middle axis TP, FP, FN). `pred`, `truth`: bool [N, E];
    `group`: int [N] in [0, n_groups) (the test sequence of each sample)."""
    E = pred.shape[1]
    cell = (group.astype(np.int64)[:, None] * E + np.arange(E)).ravel()
    counts = [np.bincount(cell, weights=x.ravel(), minlength=n_groups * E).reshape(n_groups, E)
              for x in (pred & truth, pred & ~truth, ~pred & truth)]
    return np.stack(counts, axis=1).astype(np.int64)


def macro_f1(counts: np.ndarray) -> np.ndarray:
    """Macro F1 of summed counts [..., 3, E] (TP, FP, FN): per expert F1_e = 2TP / (2TP + FP + FN),
    averaged over experts. An expert with TP + FP + FN = 0 (never in a true or a predicted set of
    these samples) has no F1 and is left out of the mean (not counted as 0 or 1); NaN where every
    expert is left out. Returns [...]."""
    tp, fp, fn = (counts[..., i, :].astype(np.float64) for i in (TP, FP, FN))
    denom = 2 * tp + fp + fn
    present = denom > 0
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(denom), where=present)
    n = present.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, f1.sum(axis=-1) / np.maximum(n, 1), np.nan)
