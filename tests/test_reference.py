"""Reference predictors: the lookup ladder's backoff, boosted trees, the speculative gate, and
`reference_predictors`, the set the evaluate stage scores."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from routecast.config.params import FeaturesParams, SyntheticParams
from routecast.data.features import FeatureMeta, Features, encode_features
from routecast.data.traces import TraceMeta
from routecast.evaluate.evaluation import reference_predictors
from routecast.predictors.references import (
    BoostedTreesFullPredictor,
    BoostedTreesPredictor,
    FrequencyPredictor,
    LookupPredictor,
    SpeculativeGatePredictor,
    lookup_ladder,
)
from routecast.sources.synthetic import generate


def hand_features(layer, history, target, num_layers=4, num_experts=4) -> Features:  # noqa: PLR0913
    """Samples written out by hand: history rows are primaries +1 (0 = padding), entry j = layer j."""
    history = np.array(history, dtype=np.int16)
    n = len(layer)
    return Features(
        meta=FeatureMeta(num_layers, num_experts, 2, history.shape[1], 1, 2048.0, "test"),
        seq_id=np.arange(n, dtype=np.int32), token_pos=np.zeros(n, dtype=np.int32),
        layer=np.array(layer, dtype=np.int16),
        primary=np.maximum(history[np.arange(n), np.minimum(layer, history.shape[1] - 1)].astype(np.int16) - 1, 0),
        secondary=np.zeros(n, dtype=np.int16),
        gating=np.full((n, 2), 0.5, dtype=np.float32), history=history,
        position=np.zeros(n, dtype=np.float32), target=np.array(target, dtype=np.int16),
        target_set=np.stack([np.array(target), (np.array(target) + 1) % num_experts], axis=1).astype(np.int16),
    )


def test_lookup_ladder_backs_off_to_shorter_contexts():
    # Layer 2 with history (e0, e1, e2): the full context (1, 2, 3) always went to expert 0,
    # while (layer 2, e1=2, e2=3) in general went to expert 3, and (layer 2, e2=3) to expert 1.
    train = hand_features(
        layer=[2, 2, 2, 2, 2, 2, 2, 2, 2],
        history=[[1, 2, 3, 0]] * 2 + [[4, 2, 3, 0]] * 3 + [[4, 1, 3, 0]] * 4,
        target=[0, 0, 3, 3, 3, 1, 1, 1, 1],
    )
    test = hand_features(
        layer=[2, 2, 2, 2],
        history=[[1, 2, 3, 0], [2, 2, 3, 0], [2, 4, 3, 0], [2, 4, 4, 0]],
        target=[0, 0, 0, 0],
    )
    best = {p.name: np.argmax(p.fit(train).scores(test), axis=1).tolist() for p in lookup_ladder(3)}
    assert best["lookup_3"] == [0, 3, 1, 1]  # seen; backs off to (e1, e2); to (e2); to the layer's frequency
    assert best["lookup_2"] == [3, 3, 1, 1]
    assert best["lookup_1"] == [1, 1, 1, 1]
    scores = LookupPredictor(3).fit(train).scores(test)
    np.testing.assert_allclose(scores.sum(axis=1), 1.0)
    # An unseen key gets exactly the backoff's distribution.
    np.testing.assert_allclose(scores[3], FrequencyPredictor().fit(train).scores(test)[3])
    # Ties among the longest context's counts are broken by the shorter context.
    assert np.argsort(-scores[0])[:2].tolist() == [0, 3]


def test_lookup_names_and_order_validation():
    assert [p.name for p in lookup_ladder(3)] == ["lookup_1", "lookup_2", "lookup_3"]
    with pytest.raises(ValueError):
        LookupPredictor(0)


def test_lookup_keeps_the_current_expert_past_a_truncated_history():
    """history_len 3 < 6 layers: at layers >= 3 the history no longer holds layer l's primary, yet
    lookup_1 (layer, e) still keys on it (the `primary` feature) and scores as with the whole history."""
    feats = encode_features(generate(SyntheticParams(num_sequences=8, tokens_per_sequence=32, num_layers=6))[0],
                            FeaturesParams(history_len=3))
    whole = encode_features(generate(SyntheticParams(num_sequences=8, tokens_per_sequence=32, num_layers=6))[0],
                            FeaturesParams())
    np.testing.assert_array_equal(LookupPredictor(1).fit(feats).scores(feats),
                                  LookupPredictor(1).fit(whole).scores(whole))
    for predictor in [FrequencyPredictor(), *lookup_ladder(3)]:
        scores = predictor.fit(feats).scores(feats)
        assert scores.shape == (len(feats), 8) and np.isfinite(scores).all()


def test_set_scores_count_the_whole_next_set():
    # Layer 2, (e1, e2) = (2, 3): the next sets were {0, 1} twice and {0, 2} once.
    train = hand_features(layer=[2, 2, 2], history=[[1, 2, 3, 0]] * 3, target=[0, 1, 0])
    train.target_set[:] = [[0, 1], [1, 0], [0, 2]]
    table = LookupPredictor(2).fit(train)
    set_scores = table.set_scores(train.take(np.arange(1)))[0]
    assert np.argsort(-set_scores, kind="stable")[:3].tolist() == [0, 1, 2]  # counts 3, 2, 1
    assert set_scores[0] == pytest.approx(3 / 6, abs=1e-3)  # 3 of the 6 set members seen in this context
    primary = table.scores(train.take(np.arange(1)))[0]
    assert primary[0] == pytest.approx(2 / 3, abs=1e-3) and primary[1] == pytest.approx(1 / 3, abs=1e-3)


def test_boosted_trees_with_more_experts_than_sklearn_categories():
    """300 experts: the ids exceed scikit-learn's 255 categories, so they enter as ordinal numbers;
    it fits and scores instead of crashing evaluate."""
    rng = np.random.default_rng(0)
    n, E = 3000, 300
    history = np.zeros((n, 4), dtype=np.int16)
    history[:, 0] = rng.integers(1, E + 1, n)
    feats = hand_features(layer=[0] * n, history=history, target=(history[:, 0] - 1 + 1) % E, num_experts=E)
    feats.seq_id[:] = np.arange(n) // 30
    for trees in (BoostedTreesPredictor(max_iter=3), BoostedTreesFullPredictor(max_iter=3)):
        scores = trees.fit(feats).scores(feats)
        assert scores.shape == (n, E) and np.isfinite(scores).all(), trees.name


def test_boosted_trees_full_reads_the_history_the_raw_ids_miss():
    """Layer 3's next expert is set by the token's expert at layer 0, while its experts at layers 2
    and 3 are noise: only the tree reference over the whole history can see it (issue 23: on the
    FLAME log a token's path through the earlier layers identifies it, and the raw-id trees sit at
    the layer's frequency)."""
    rng = np.random.default_rng(0)
    n, E = 4000, 8
    history = np.zeros((n, 5), dtype=np.int16)
    history[:, :4] = rng.integers(1, E + 1, (n, 4))
    target = (history[:, 0] - 1) * 3 % E  # a function of layer 0 alone
    def feats(rows):
        f = hand_features(layer=[3] * len(rows), history=history[rows], target=target[rows], num_layers=5,
                          num_experts=E)
        f.seq_id[:] = np.asarray(rows) // 20
        return f
    train, test = feats(np.arange(3000)), feats(np.arange(3000, n))
    full = top2(BoostedTreesFullPredictor().fit(train).scores(test), test.target)
    raw = top2(BoostedTreesPredictor().fit(train).scores(test), test.target)
    assert full > 0.99 and raw < 0.4, (full, raw)  # raw: about 2 / 8 by chance


@pytest.fixture(scope="module")
def synthetic_split():
    params = SyntheticParams(num_sequences=24, tokens_per_sequence=64, num_layers=8, spec_noise=1.0)
    traces, _ = generate(params)
    feats = encode_features(traces, FeaturesParams())
    held = feats.seq_id < 4
    return traces.meta, feats.take(~held), feats.take(held)


def top2(scores: np.ndarray, target: np.ndarray) -> float:
    return float((np.argsort(-scores, axis=1)[:, :2] == target[:, None].astype(np.int64)).any(axis=1).mean())


def test_reference_predictors_for_a_synthetic_trace(synthetic_split):
    meta, train, test = synthetic_split
    predictors = reference_predictors(meta, train)
    names = [p.name for p in predictors]
    assert names == ["frequency", "lookup_1", "lookup_2", "lookup_3", "boosted_trees", "boosted_trees_full",
                     "oracle", "speculative_gate"]
    acc = {}
    for p in predictors:
        scores = p.scores(test)
        assert scores.shape == (len(test), meta.num_experts) and np.isfinite(scores).all(), p.name
        acc[p.name] = top2(scores, test.target)
    assert acc["boosted_trees"] > acc["frequency"] and acc["boosted_trees_full"] > acc["frequency"]
    assert acc["oracle"] > max(acc[n] for n in ("frequency", "lookup_1", "lookup_2", "lookup_3", "boosted_trees"))
    # The speculative gate sees (noisy) logits from the true next layer.
    np.testing.assert_array_equal(SpeculativeGatePredictor().scores(test), test.spec_logits)
    assert acc["speculative_gate"] > acc["frequency"]


def test_reference_predictors_without_oracle_or_spec_logits(synthetic_split):
    meta, train, test = synthetic_split
    imported = TraceMeta(meta.num_layers, meta.num_experts, meta.top_k, source="import")
    train = dataclasses.replace(train, spec_logits=None)
    names = [p.name for p in reference_predictors(imported, train)]
    assert names == ["frequency", "lookup_1", "lookup_2", "lookup_3", "boosted_trees", "boosted_trees_full"]
    with pytest.raises(ValueError, match="spec_logits"):
        SpeculativeGatePredictor().scores(dataclasses.replace(test, spec_logits=None))


def test_boosted_trees_is_seeded_and_handles_tiny_splits(synthetic_split):
    _, train, test = synthetic_split
    for trees in (BoostedTreesPredictor, BoostedTreesFullPredictor):
        a = trees(max_iter=5).fit(train).scores(test)
        b = trees(max_iter=5).fit(train).scores(test)
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(a.sum(axis=1), 1.0, atol=1e-6)
        one_class = dataclasses.replace(train.take(np.arange(50)), target=np.full(50, 3, dtype=np.int16))
        scores = trees().fit(one_class).scores(test)
        assert (scores.argmax(axis=1) == 3).all()


def test_speculative_gate_only_when_the_target_is_the_next_layer():
    """spec_logits are layer l + 1's router logits: with lookahead 2 they do not score the target."""
    params = SyntheticParams(num_sequences=6, tokens_per_sequence=16, num_layers=6, spec_noise=1.0)
    traces, _ = generate(params)
    for lookahead, expected in ((1, True), (2, False)):
        feats = encode_features(traces, FeaturesParams(horizons=[lookahead]))
        names = [p.name for p in reference_predictors(traces.meta, feats)]
        assert ("speculative_gate" in names) == expected, lookahead
