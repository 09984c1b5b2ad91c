"""Set metrics (MoE-Beyond's macro F1 and per-expert accuracy) on hand-computed cases, their
bootstrap from summed counts, memberships, and traces without a primary (unweighted): null top-1 /
top-2, paired set recall differences, set recall per layer, and a report that shows set metrics."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pandas as pd
import pytest
import torch

from routecast.config.params import EvaluateParams, FeaturesParams, SplitParams, SyntheticParams
from routecast.data.features import FeatureMeta, Features, encode_features
from routecast.data.split import split_features
from routecast.evaluate.evaluation import (
    ModelScorer,
    SequenceBootstrap,
    evaluate,
    memberships,
    score_all,
    sequence_index,
    summarise,
)
from routecast.evaluate.scoring import (
    expert_accuracy,
    macro_f1,
    membership_matrix,
    predicted_sets,
    sample_hits,
    set_counts,
)
from routecast.predictors.references import FrequencyPredictor, SpeculativeGatePredictor
from routecast.sources.synthetic import generate

EXACT = dict(rel=1e-12, abs=1e-12)

# E = 4, k = 2; three samples, two sequences (samples 0 and 1 in sequence 10, sample 2 in 20).
TARGET_SETS = [[0, 1], [1, 2], [0, 2]]
SET_SCORES = np.array([
    [0.80, 0.60, 0.50, 0.10],  # top-2 {0, 1}; >= 0.5: {0, 1, 2} (three experts, 0.5 itself counts)
    [0.70, 0.55, 0.45, 0.30],  # top-2 {0, 1}; >= 0.5: {0, 1}
    [0.90, 0.20, 0.45, 0.45],  # top-2 {0, 2} (2 and 3 tie: the lower id); >= 0.5: {0} (one expert)
])  # every row sums to k = 2: memberships as they are
SEQ_ID = [10, 10, 20]
# Top-2, per expert over the three samples:
#   e0: TP s0, FP s1, TP s2 -> TP 2, FP 1, FN 0 -> F1 4/5
#   e1: TP s0, TP s1        -> TP 2             -> F1 1
#   e2: FN s1, TP s2        -> TP 1, FN 1       -> F1 2/3
#   e3: never true, never predicted: no F1, left out of the mean (as 0 it would be 0.617, as 1 0.867)
MACRO_F1 = (4 / 5 + 1 + 2 / 3) / 3  # 37/45
# >= 0.5: e0 as above (4/5); e1 TP 2 (1); e2 FP s0, FN s1, FN s2 -> TP 0 (F1 0); e3 left out
MACRO_F1_P50 = (4 / 5 + 1 + 0) / 3  # 0.6
SET_RECALL = (1 + 0.5 + 1) / 3
EXPERT_ACCURACY = (1 + (1 - 2 / 4) + 1) / 3  # s1 gets e0 (FP) and e2 (FN) wrong
EXPERT_ACCURACY_P50 = ((1 - 1 / 4) + (1 - 2 / 4) + (1 - 1 / 4)) / 3  # s0: e2 FP; s1: e0, e2; s2: e2 FN


def hand_features(target_set, seq_id, num_experts: int = 4, weighted: bool = True, layer=None) -> Features:
    n, k = len(target_set), len(target_set[0])
    return Features(
        meta=FeatureMeta(4, num_experts, k, 4, 1, 2048.0, "test", weighted),
        seq_id=np.array(seq_id, dtype=np.int32), token_pos=np.arange(n, dtype=np.int32),
        layer=np.array(layer if layer is not None else [0] * n, dtype=np.int16),
        primary=np.zeros(n, dtype=np.int16), secondary=np.ones(n, dtype=np.int16),
        gating=np.full((n, k), 1.0 / k, dtype=np.float32), history=np.ones((n, 4), dtype=np.int16),
        position=np.zeros(n, dtype=np.float32), target=np.array([s[0] for s in target_set], dtype=np.int16),
        target_set=np.array(target_set, dtype=np.int16),
    )


class Fixed:
    """A predictor with given scores: `scores` rank the primary, `set_scores` the set."""

    def __init__(self, name: str, scores: np.ndarray, set_scores: np.ndarray | None = None) -> None:
        self.name, self._scores = name, scores
        self._set_scores = scores if set_scores is None else set_scores

    def scores(self, test: Features) -> np.ndarray:
        return self._scores

    def set_scores(self, test: Features) -> np.ndarray:
        return self._set_scores


def test_counts_f1_and_accuracy_by_hand() -> None:
    feats = hand_features(TARGET_SETS, SEQ_ID)
    truth = membership_matrix(feats.target_set, 4)
    pred = predicted_sets(SET_SCORES, SET_SCORES, feats)
    np.testing.assert_array_equal(pred["topk"], [[1, 1, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0]])
    np.testing.assert_array_equal(pred["p50"], [[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]])
    n_seq, seq_of = sequence_index(feats.seq_id)
    counts = set_counts(pred["topk"], truth, seq_of, n_seq)
    #                         TP            FP            FN     (per expert 0..3)
    np.testing.assert_array_equal(counts, [[[1, 2, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0]],   # sequence 10
                                           [[1, 0, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]]])  # sequence 20
    assert float(macro_f1(counts.sum(axis=0))) == pytest.approx(MACRO_F1, **EXACT)
    p50 = set_counts(pred["p50"], truth, seq_of, n_seq).sum(axis=0)
    np.testing.assert_array_equal(p50, [[2, 2, 0, 0], [1, 0, 1, 0], [0, 0, 2, 0]])
    assert float(macro_f1(p50)) == pytest.approx(MACRO_F1_P50, **EXACT)
    assert expert_accuracy(pred["topk"], truth).mean() == pytest.approx(EXPERT_ACCURACY, **EXACT)
    assert expert_accuracy(pred["p50"], truth).mean() == pytest.approx(EXPERT_ACCURACY_P50, **EXACT)
    assert sample_hits(SET_SCORES, SET_SCORES, feats)["set_recall"].mean() == pytest.approx(SET_RECALL, **EXACT)
    # no expert with any count: no mean at all (NaN), never a made-up 0 or 1
    assert np.isnan(macro_f1(np.zeros((3, 4))))


def test_summary_writes_every_set_metric_with_its_interval() -> None:
    feats = hand_features(TARGET_SETS, SEQ_ID)
    entry = summarise(score_all([Fixed("p", SET_SCORES)], feats), feats, EvaluateParams(bootstrap=200))["p"]
    for metric, value in {"set_recall": SET_RECALL, "macro_f1": MACRO_F1, "macro_f1_p50": MACRO_F1_P50,
                          "expert_accuracy": EXPERT_ACCURACY, "expert_accuracy_p50": EXPERT_ACCURACY_P50}.items():
        assert entry[metric] == pytest.approx(value, **EXACT), metric
        assert entry[f"{metric}_lo"] <= entry[metric] <= entry[f"{metric}_hi"], metric
    assert entry["n_test_sequences"] == 2


def test_bootstrap_f1_comes_from_each_resamples_summed_counts() -> None:
    """Two sequences: a resample is A+A, A+B or B+B. From summed counts their macro F1 is 5/9, 37/45
    and 1 (A alone: e0 TP 1 FP 1 -> 2/3, e1 1, e2 FN only -> 0; B alone: e0 and e2 TP -> 1, e1 and e3
    left out). Averaging the two sequences' own F1 would give A+B (5/9 + 1) / 2 = 7/9 instead."""
    feats = hand_features(TARGET_SETS, SEQ_ID)
    counts = score_all([Fixed("p", SET_SCORES)], feats)["p"].counts["macro_f1"]
    boot = SequenceBootstrap(feats.seq_id, resamples=400, seed=3)
    by_draw = {(2.0, 0.0): 5 / 9, (1.0, 1.0): 37 / 45, (0.0, 2.0): 1.0}
    expected = np.array([by_draw[tuple(w)] for w in boot.weights])
    assert len(set(map(tuple, boot.weights))) == 3  # every kind of resample occurs
    lo, hi = boot.summed_interval(counts, macro_f1)
    assert (lo, hi) == (pytest.approx(np.percentile(expected, 2.5), **EXACT),
                        pytest.approx(np.percentile(expected, 97.5), **EXACT))
    # the median resample is A+B: its statistic is the pooled one, 37/45, not 7/9
    assert boot.summed_interval(counts, macro_f1, level=0.0) == (pytest.approx(37 / 45, **EXACT),) * 2
    assert SequenceBootstrap(np.zeros(3), 100, 0).summed_interval(counts[:1], macro_f1) == (None, None)


def test_memberships_follow_the_contract() -> None:
    feats = hand_features(TARGET_SETS, SEQ_ID)
    distribution = SET_SCORES / 2  # rows summing to 1: the reference tables' normalised set counts
    np.testing.assert_allclose(memberships(Fixed("t", distribution), feats, distribution, distribution), SET_SCORES)
    np.testing.assert_allclose(memberships(Fixed("m", SET_SCORES), feats, SET_SCORES, SET_SCORES), SET_SCORES)
    logits = np.log(distribution) + 3.0  # not probabilities: softmax, times k
    np.testing.assert_allclose(memberships(SpeculativeGatePredictor(), feats, logits, logits), SET_SCORES)
    # a frequency table's set scores sum to 1 per layer: times k (the ranking is untouched)
    freq = FrequencyPredictor().fit(feats)
    np.testing.assert_allclose(memberships(freq, feats, freq.scores(feats), freq.set_scores(feats)).sum(axis=1), 2.0)
    # a trained model: k * softmax of its output, whatever target it was trained on
    model = torch.nn.Linear(1, 1)
    scorer = ModelScorer("tuned", model, target="set")
    np.testing.assert_allclose(scorer.memberships(feats, distribution), SET_SCORES)
    with pytest.raises(ValueError, match="no membership rule"):
        ModelScorer("tuned", model, target="bce")


def test_an_unweighted_trace_has_no_primary_figures(caplog: pytest.LogCaptureFixture) -> None:
    feats = hand_features(TARGET_SETS * 4, np.repeat([0, 1, 2, 3], 3), weighted=False)
    primary = np.tile([0.1, 0.2, 0.3, 0.4], (len(feats), 1))
    scored = score_all([Fixed("tuned", primary, np.tile(SET_SCORES, (4, 1))), Fixed("oracle", primary),
                        Fixed("lookup_3", primary)], feats)
    with caplog.at_level(logging.INFO):
        out = summarise(scored, feats, EvaluateParams(bootstrap=100))
    assert sum("no primary" in r.getMessage() for r in caplog.records) == 1
    for name in ("tuned", "oracle", "lookup_3"):
        for key in ("top1", "top1_lo", "top1_hi", "top2", "top2_lo", "top2_hi"):
            assert out[name][key] is None, (name, key)
        assert out[name]["set_recall"] is not None
    assert out["tuned"]["macro_f1"] == pytest.approx(MACRO_F1, **EXACT)
    assert out["tuned"]["top2_vs_oracle"] is None
    diff = out["tuned"]["vs"]["lookup_3"]
    assert set(diff) == {"set_recall_diff", "set_recall_diff_lo", "set_recall_diff_hi"}
    # lookup_3's set (from its primary scores) is {3, 2}: recall (0 + 0.5 + 0.5) / 3
    assert diff["set_recall_diff"] == pytest.approx(SET_RECALL - 1 / 3, **EXACT)
    # the same hits on a weighted trace: top-1 / top-2 and the paired top-2 difference as before
    weighted = dataclasses.replace(feats, meta=dataclasses.replace(feats.meta, weighted=True))
    out = summarise(score_all([Fixed("tuned", primary), Fixed("lookup_3", primary)], weighted), weighted,
                    EvaluateParams(bootstrap=100))
    assert out["tuned"]["top2"] is not None and set(out["tuned"]["vs"]["lookup_3"]) == {
        "top2_diff", "top2_diff_lo", "top2_diff_hi"}


@pytest.fixture(scope="module")
def unweighted_run():
    params = SyntheticParams(num_sequences=20, tokens_per_sequence=16, num_layers=6, seed=2)
    traces, _ = generate(params)
    train, test = split_features(encode_features(traces, FeaturesParams()), SplitParams(test_fraction=0.2))

    def unweighted(f: Features) -> Features:
        return dataclasses.replace(f, meta=dataclasses.replace(f.meta, weighted=False))

    return traces, unweighted(train.take(~train.is_val)), unweighted(train.take(train.is_val)), unweighted(test)


def test_evaluate_on_an_unweighted_trace(unweighted_run) -> None:
    traces, fit, val, test = unweighted_run
    result = evaluate({}, traces.meta, fit, val, test, EvaluateParams(bootstrap=100), FeaturesParams())
    assert result.per_layer_metric == "set_recall" and result.confusion == []
    for name, entry in result.metrics.items():
        if name == "validation":
            continue
        assert entry["top1"] is None and entry["top2"] is None
        layers = result.per_layer[name]
        assert set(layers) == set(np.unique(test.layer).tolist())
        weights = [np.sum(test.layer == layer) for layer in layers]
        assert np.average(list(layers.values()), weights=weights) == pytest.approx(entry["set_recall"])
    assert all(v["top2"] is None and v["set_recall"] is not None for v in result.metrics["validation"].values())


def unweighted_block(recall: float, f1: float, sequences: int = 20) -> dict[str, object]:
    out: dict[str, object] = {"n_test": 400, "n_test_sequences": sequences}
    for metric, value in {"top1": None, "top2": None, "set_recall": recall, "macro_f1": f1,
                          "macro_f1_p50": f1 / 2}.items():
        out.update({metric: value, f"{metric}_lo": None if value is None else value - 0.01,
                    f"{metric}_hi": None if value is None else value + 0.01})
    return out


def test_report_shows_set_metrics_for_an_unweighted_trace() -> None:
    from routecast.report import plotting
    from routecast.report.summary import metrics_section

    new = {"tuned": {**unweighted_block(0.5, 0.45), "vs": {"lookup_3": {
               "set_recall_diff": 0.1, "set_recall_diff_lo": 0.05, "set_recall_diff_hi": 0.15}}},
           "lookup_3": unweighted_block(0.4, 0.35)}
    md = metrics_section({}, new, "main")
    assert "| predictor | set recall | macro F1 (top-k) | macro F1 (p ≥ 0.5) |" in md
    assert "| top-1" not in md and "No top-1 or top-2: the trace has no primary" in md
    assert "| **tuned** | — → 0.500 [0.490, 0.510] | — → 0.450 [0.440, 0.460] | — → 0.225 [0.215, 0.235] |" in md
    assert "test set recall against each other predictor" in md
    assert "- tuned beats lookup_3 by +10.0 points [5.0, 15.0] (none at `main`)" in md
    frame = pd.DataFrame({"layer": [0, 1, 0, 1], "predictor": ["tuned", "tuned", "lookup_3", "lookup_3"],
                          "set_recall": [0.5, 0.6, 0.4, 0.45]})
    fig = plotting.per_layer_top2(frame)
    assert "set recall" in fig.axes[0].get_title()
    assert {line.get_label() for line in fig.axes[0].lines} == {"tuned", "lookup_3"}
