"""Evaluation: every metric on hand-made cases, the sequence bootstrap, paired differences and the
ratio to the oracle, and extra test traces (including the shared Mixtral log)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from routecast.config.params import EvaluateParams, ExtraTest, FeaturesParams, LogsParams, SplitParams, SyntheticParams
from routecast.data.features import FeatureMeta, Features, encode_features
from routecast.data.split import split_features
from routecast.data.traces import TraceError, write_traces
from routecast.evaluate.evaluation import (
    METRICS,
    ModelScorer,
    Scored,
    SequenceBootstrap,
    evaluate,
    per_layer_top2,
    score_metrics,
    summarise,
)
from routecast.evaluate.scoring import ranked, sample_hits
from routecast.sources.synthetic import generate


def hand_features(target, target_set, layer=None, seq_id=None, num_experts=4) -> Features:
    n = len(target)
    k = len(target_set[0])
    return Features(
        meta=FeatureMeta(4, num_experts, k, 4, 1, 2048.0, "test"),
        seq_id=np.array(seq_id if seq_id is not None else [0] * n, dtype=np.int32),
        token_pos=np.arange(n, dtype=np.int32), layer=np.array(layer if layer is not None else [0] * n, dtype=np.int16),
        primary=np.zeros(n, dtype=np.int16), secondary=np.ones(n, dtype=np.int16),
        gating=np.full((n, k), 1.0 / k, dtype=np.float32), history=np.ones((n, 4), dtype=np.int16),
        position=np.zeros(n, dtype=np.float32), target=np.array(target, dtype=np.int16),
        target_set=np.array(target_set, dtype=np.int16),
    )


def test_metrics_on_hand_made_cases() -> None:
    # Scores rank experts 3 > 1 > 0 > 2 for every sample.
    scores = np.tile([0.2, 0.3, 0.0, 0.5], (4, 1))
    feats = hand_features(target=[3, 1, 0, 2], target_set=[[3, 1], [1, 3], [0, 3], [2, 0]])
    m = score_metrics(scores, feats)
    assert m["top1"] == 0.25  # only sample 0's target (3) is the best
    assert m["top2"] == 0.5  # 3 and 1 are the best two
    # predicted set {3, 1}: covers {3,1} fully, {1,3} fully, {0,3} half, {2,0} not at all
    assert m["set_recall"] == pytest.approx((1 + 1 + 0.5 + 0) / 4)
    assert m["exact_set"] == 0.5
    assert m["n_test"] == 4
    # Set scores, when given, rank the set; the primary metrics keep the primary scores.
    set_scores = np.tile([0.4, 0.0, 0.1, 0.5], (4, 1))  # predicted set {3, 0}
    m2 = score_metrics(scores, feats, set_scores)
    assert (m2["top1"], m2["top2"]) == (m["top1"], m["top2"])
    assert m2["set_recall"] == pytest.approx((0.5 + 0.5 + 1 + 0.5) / 4) and m2["exact_set"] == 0.25


def test_ties_go_to_the_lower_expert() -> None:
    np.testing.assert_array_equal(ranked(np.array([[0.2, 0.4, 0.4, 0.0]]), 3), [[1, 2, 0]])


def test_per_layer_top2_on_a_hand_made_case() -> None:
    scores = np.tile([0.1, 0.2, 0.3, 0.4], (4, 1))  # best two: 3, 2
    feats = hand_features(target=[3, 0, 2, 2], target_set=[[3, 0], [0, 1], [2, 1], [2, 3]], layer=[0, 0, 1, 2])
    assert per_layer_top2(ranked(scores, 2), feats) == {0: 0.5, 1: 1.0, 2: 1.0}


def test_bootstrap_resamples_sequences_not_samples() -> None:
    """One sequence always right, one always wrong: every resample draws whole sequences, so the
    mean moves in steps of a whole sequence's weight; with samples resampled it would not."""
    seq = np.array([0] * 90 + [1] * 10)
    values = np.array([1.0] * 90 + [0.0] * 10)
    boot = SequenceBootstrap(seq, resamples=500, seed=0)
    lo, hi = boot.interval(values)
    assert (lo, hi) == (0.0, 1.0)  # a resample of two sequences is both, either, or neither... never 0.9 only
    # many identical sequences: a tight interval around the mean
    seq = np.repeat(np.arange(50), 10)
    values = np.tile([1.0] * 7 + [0.0] * 3, 50)
    assert SequenceBootstrap(seq, 500, 0).interval(values) == (pytest.approx(0.7), pytest.approx(0.7))


def test_no_interval_from_a_single_sequence() -> None:
    values = np.array([1.0, 0.0, 1.0])
    assert SequenceBootstrap(np.zeros(3), 200, 0).interval(values) == (None, None)


def test_bootstrap_interval_covers_the_truth_at_about_95_percent() -> None:
    """Sequences with random per-sequence accuracy: the 95% interval holds the population mean in
    about 95% of repeated experiments (checked loosely: 85% to 100% of 60)."""
    rng = np.random.default_rng(0)
    covered = 0
    for trial in range(60):
        p = rng.beta(6, 4, size=40)  # population mean 0.6
        seq = np.repeat(np.arange(40), 30)
        values = (rng.random(len(seq)) < p[seq]).astype(float)
        lo, hi = SequenceBootstrap(seq, 400, trial).interval(values)
        covered += lo <= 0.6 <= hi
    assert 51 <= covered <= 60


def test_summary_has_intervals_paired_differences_and_oracle_ratio() -> None:
    rng = np.random.default_rng(1)
    n = 600
    feats = hand_features(target=rng.integers(0, 4, n), target_set=np.stack([np.zeros(n), np.ones(n)], 1),
                          seq_id=np.repeat(np.arange(30), 20))
    def fake(p_hit: float) -> Scored:
        hits = {m: (rng.random(n) < p_hit).astype(float) for m in METRICS}
        return Scored(hits, np.zeros((n, 2), dtype=np.int64), np.zeros((n, 4), dtype=np.int64))

    scored = {"tuned": fake(0.7), "lookup_3": fake(0.5), "oracle": fake(0.8), "baseline": fake(0.6)}
    out = summarise(scored, feats, EvaluateParams(bootstrap=300))
    for name, s in scored.items():
        assert out[name]["top2"] == pytest.approx(s.hits["top2"].mean())
        assert out[name]["top2_lo"] <= out[name]["top2"] <= out[name]["top2_hi"]
        assert out[name]["n_test_sequences"] == 30
    diff = out["tuned"]["vs"]["lookup_3"]
    assert diff["top2_diff"] == pytest.approx(scored["tuned"].hits["top2"].mean()
                                              - scored["lookup_3"].hits["top2"].mean())
    assert 0 < diff["top2_diff_lo"] <= diff["top2_diff"] <= diff["top2_diff_hi"]  # 20 points apart: clearly real
    ratio = scored["tuned"].hits["top2"].mean() / scored["oracle"].hits["top2"].mean()
    assert out["tuned"]["top2_vs_oracle"] == pytest.approx(ratio)
    assert out["tuned"]["top2_vs_oracle_lo"] <= ratio <= out["tuned"]["top2_vs_oracle_hi"]
    assert "vs" not in out["lookup_3"] and "top2_vs_oracle" not in out["lookup_3"]


def test_sample_hits_rejects_scores_of_the_wrong_shape() -> None:
    feats = hand_features(target=[0, 1], target_set=[[0, 1], [1, 0]])
    with pytest.raises(ValueError, match=r"scores must be \[2, 4\]"):
        sample_hits(np.zeros((2, 3)), np.zeros((2, 3)), feats)


@pytest.fixture(scope="module")
def small_run():
    params = SyntheticParams(num_sequences=20, tokens_per_sequence=16, num_layers=6, seed=2)
    traces, _ = generate(params)
    train, test = split_features(encode_features(traces, FeaturesParams()), SplitParams(test_fraction=0.2))
    fit = train.take(~train.is_val)
    return traces, fit, train.take(train.is_val), test


def test_validation_scores_sit_beside_the_test_ones(small_run) -> None:
    traces, fit, val, test = small_run
    result = evaluate({}, traces.meta, fit, val, test, EvaluateParams(bootstrap=200), FeaturesParams())
    validation = result.metrics["validation"]
    assert set(validation) == {"frequency", "lookup_1", "lookup_2", "lookup_3", "boosted_trees", "boosted_trees_full",
                               "oracle"}
    assert validation["lookup_3"]["n"] == len(val)
    from routecast.predictors.references import LookupPredictor
    lookup_3 = LookupPredictor(3).fit(fit)
    assert validation["lookup_3"]["top2"] == pytest.approx(score_metrics(lookup_3.scores(val), val)["top2"])


def extra_test_params(tmp_path: Path, name: str, synthetic: SyntheticParams) -> EvaluateParams:
    """Evaluate params with one extra test: a synthetic trace written as `<name>.parquet`."""
    other, _ = generate(synthetic)
    write_traces(tmp_path / f"{name}.parquet", other)
    return EvaluateParams(bootstrap=200, extra_tests=[
        ExtraTest(name, LogsParams(format="parquet", path=str(tmp_path / f"{name}.parquet")))])


def test_extra_test_traces_are_scored_by_every_predictor(small_run, tmp_path: Path) -> None:
    traces, fit, _, test = small_run
    params = extra_test_params(tmp_path, "other", SyntheticParams(num_sequences=6, tokens_per_sequence=16,
                                                                  num_layers=6, seed=9))
    result = evaluate({}, traces.meta, fit, fit.take(np.arange(0)), test, params, FeaturesParams())
    extra = result.metrics["extra_tests"]["other"]
    assert set(extra) >= {"frequency", "lookup_1", "lookup_3", "boosted_trees", "oracle"}
    assert extra["lookup_3"]["n_test"] == 6 * 16 * 5
    # the oracle of an extra synthetic trace is that trace's own generator: the best there too
    assert extra["oracle"]["top2"] >= max(extra[n]["top2"] for n in ("lookup_3", "boosted_trees"))
    json.dumps(result.metrics)  # the metrics file is plain JSON


def test_an_extra_trace_of_another_shape_is_refused(small_run, tmp_path: Path) -> None:
    traces, fit, _, test = small_run
    params = extra_test_params(tmp_path, "six", SyntheticParams(num_sequences=2, tokens_per_sequence=8,
                                                                num_layers=6, num_experts=6))
    with pytest.raises(TraceError, match="six.*num_experts=6, the training trace 8"):
        evaluate({}, traces.meta, fit, fit.take(np.arange(0)), test, params, FeaturesParams())


def test_every_horizon_is_scored_with_its_own_references_oracle_and_heads() -> None:
    """features.horizons [1, 2, 4]: the main horizon's figures as before, and under `horizons` each
    later horizon's, from the models' heads (the mixture's pushed posterior, the context kind's
    heads, read from the whole test sequences) and references fitted for it; a model trained for
    the main horizon alone is left out there, saying so. The oracle's share at every horizon is the
    model's top-2 over the oracle's, and the oracle's top-2 falls with the horizon (the type
    posterior is pushed further)."""
    from routecast.config.params import ModelParams, TrainParams
    from routecast.fit.training import fit_predictor
    from routecast.predictors.references import LookupPredictor

    params = SyntheticParams(num_sequences=24, tokens_per_sequence=24, num_layers=8, seed=4)
    traces, _ = generate(params)
    features = FeaturesParams(horizons=[1, 2, 4])
    train, test = split_features(encode_features(traces, features), SplitParams(test_fraction=0.2))
    fit, val = train.take(~train.is_val), train.take(train.is_val)
    mixture = fit_predictor(ModelParams.of("mixture", num_types=8, restarts=1), TrainParams(threads=1), fit, val).model
    context = fit_predictor(ModelParams.of("context", width=16, layers=1, heads=2), TrainParams(epochs=1, threads=1),
                            fit, val).model
    main_only = fit_predictor(ModelParams.of("mlp", architecture=[16]), TrainParams(epochs=1, threads=1),
                              fit.at_horizon(1), val.at_horizon(1)).model  # the main horizon only
    result = evaluate({"tuned": mixture, "baseline": main_only, "context": context}, traces.meta, fit, val, test,
                      EvaluateParams(bootstrap=100), features)
    metrics = result.metrics
    assert set(metrics["horizons"]) == {"2", "4"} and "baseline" in metrics  # main_only: the main horizon
    oracle_top2 = [metrics["oracle"]["top2"]]
    for d in (2, 4):
        block = metrics["horizons"][str(d)]
        assert "baseline" not in block and {"tuned", "context", "oracle", "lookup_3", "boosted_trees"} <= set(block)
        test_d = test.at_horizon(d)
        with_head = ModelScorer("context", context.at_horizon(d)).scores(test.at_horizon(1))  # whole sequences
        rows = np.flatnonzero(test.horizon_set[:, (1, 2, 4).index(d), 0] >= 0)
        want = score_metrics(with_head[rows], test_d)["top2"]
        assert block["context"]["top2"] == pytest.approx(want)
        assert block["tuned"]["n_test"] == len(test_d) < len(test)
        lookup = LookupPredictor(3).fit(fit.at_horizon(d))
        assert block["lookup_3"]["top2"] == pytest.approx(score_metrics(lookup.scores(test_d), test_d)["top2"])
        ratio = block["tuned"]["top2"] / block["oracle"]["top2"]
        assert block["tuned"]["top2_vs_oracle"] == pytest.approx(ratio)
        assert block["tuned"]["top2_lo"] <= block["tuned"]["top2"] <= block["tuned"]["top2_hi"]
        assert set(block["tuned"]["vs"]) == set(block) - {"tuned", "validation"}
        val_d = val.at_horizon(d)  # the same figures, as points, on the validation samples with a target at l + d
        assert block["validation"]["tuned"]["n"] == len(val_d) > 0
        want = score_metrics(lookup.scores(val_d), val_d)["top2"]
        assert block["validation"]["lookup_3"]["top2"] == pytest.approx(want)
        oracle_top2.append(block["oracle"]["top2"])
    assert oracle_top2[0] > oracle_top2[1] > oracle_top2[2]
    rows = {(d, name): (top2, recall) for d, name, top2, recall in result.per_horizon}  # per_horizon.csv
    assert rows[(1, "baseline")] == (metrics["baseline"]["top2"], metrics["baseline"]["set_recall"])
    assert rows[(4, "oracle")] == (oracle_top2[2], metrics["horizons"]["4"]["oracle"]["set_recall"])
    main = len(metrics["validation"])  # every predictor scored at the main horizon
    scored_there = sum(len(set(b) - {"validation"}) for b in metrics["horizons"].values())
    assert (2, "baseline") not in rows and len(rows) == main + scored_there


def test_a_ranking_holds_only_its_own_columns() -> None:
    """evaluate keeps every predictor's top-2 and ranking for the whole stage: each must own its
    [N, k] memory, not be a view that pins the whole [N, E] argsort."""
    scores = np.random.default_rng(0).random((1000, 64))
    best = ranked(scores, 2)
    assert best.base is None and best.nbytes == 1000 * 2 * 8
    np.testing.assert_array_equal(best, np.argsort(-scores, axis=1, kind="stable")[:, :2])


def test_the_next_token_is_scored_with_its_own_references_oracle_and_head() -> None:
    """features.next_token: under `horizons.next_token`, every predictor on the test samples whose
    token has a next one: the mixture's next-token head (its fitted persistence), references fitted
    on the next token's targets and the exact oracle; the mixture is near the oracle there (the
    generator's own form), and the CSV per horizon keeps the layer horizons only."""
    from routecast.config.params import NEXT_TOKEN, ModelParams, TrainParams
    from routecast.fit.training import fit_predictor
    from routecast.predictors.oracle import OraclePredictor, next_layer_probs

    params = SyntheticParams(num_sequences=32, tokens_per_sequence=24, num_layers=8, seed=4, route_persistence=0.4)
    traces, _ = generate(params)
    features = FeaturesParams(next_token=True)
    train, test = split_features(encode_features(traces, features), SplitParams(test_fraction=0.2))
    fit, val = train.take(~train.is_val), train.take(train.is_val)
    mixture = fit_predictor(ModelParams.of("mixture", num_types=8, restarts=1), TrainParams(threads=1), fit, val).model
    result = evaluate({"tuned": mixture}, traces.meta, fit, val, test, EvaluateParams(bootstrap=100), features)
    block = result.metrics["horizons"]["next_token"]
    nxt = test.at_horizon(NEXT_TOKEN)
    assert block["tuned"]["n_test"] == len(nxt) == len(test) * 23 // 24  # every token but each sequence's last
    assert {"tuned", "oracle", "frequency", "lookup_1", "boosted_trees"} <= set(block)
    oracle_top2 = score_metrics(next_layer_probs(OraclePredictor.from_trace_meta(traces.meta).router, nxt), nxt)["top2"]
    assert block["oracle"]["top2"] == pytest.approx(oracle_top2)
    assert block["tuned"]["top2_vs_oracle"] > 0.95
    assert block["oracle"]["top2"] > block["frequency"]["top2"] + 0.1  # the repeat is worth knowing
    assert all(d != "next_token" for d, *_ in result.per_horizon) and {d for d, *_ in result.per_horizon} == {1}
