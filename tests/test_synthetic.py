"""The synthetic generator: valid, seeded, fast, consistent tables, and calibrated to Mixtral."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from conftest import ROOT
from routecast.config.params import FeaturesParams, SyntheticParams, load_params
from routecast.data.features import encode_features
from routecast.data.traces import validate_batch
from routecast.evaluate.scoring import ranked
from routecast.predictors.references import FrequencyPredictor, lookup_ladder
from routecast.sources.synthetic import build_router, generate

# Published Mixtral-8x7B lookup ladder (shared/traces/README.md): test (top-1, top-2), held-out problems.
PUBLISHED = {"lookup_1": (0.258, 0.445), "lookup_2": (0.334, 0.528), "lookup_3": (0.390, 0.582)}
TOLERANCE = 0.03  # the contract: within 3 points


def default_params(**changes) -> SyntheticParams:
    """extract.synthetic exactly as params.yaml sets it, with `changes`."""
    return dataclasses.replace(load_params(ROOT / "params.yaml").extract.synthetic, **changes)


def topk_hits(scores: np.ndarray, target: np.ndarray, k: int) -> np.ndarray:
    return (ranked(scores, k) == target[:, None].astype(np.int64)).any(axis=1)


def ladder_accuracy(params: SyntheticParams, test_seqs_per_fold: list[np.ndarray]) -> dict[str, tuple[float, float]]:
    """Ladder test top-1/top-2, pooled over folds that each hold out whole sequences."""
    feats = encode_features(generate(params)[0], FeaturesParams())
    hits: dict[str, list[np.ndarray]] = {}
    for test_seqs in test_seqs_per_fold:
        held = np.isin(feats.seq_id, test_seqs)
        train, test = feats.take(~held), feats.take(held)
        for predictor in [FrequencyPredictor(), *lookup_ladder(3)]:
            scores = predictor.fit(train).scores(test)
            hits.setdefault(predictor.name, []).append(
                np.stack([topk_hits(scores, test.target, 1), topk_hits(scores, test.target, 2)]))
    return {name: tuple(np.concatenate(h, axis=1).mean(axis=1)) for name, h in hits.items()}


def test_generate_is_valid_seeded_and_complete():
    params = SyntheticParams(num_sequences=3, tokens_per_sequence=20, num_layers=6, num_experts=8, top_k=3,
                             spec_noise=0.5)
    traces, router = generate(params)
    validate_batch(traces.meta, traces.seq_id, traces.token_pos, traces.layer, traces.experts, traces.weights,
                   spec_logits=traces.spec_logits)
    assert len(traces) == 3 * 20 * 6
    assert traces.meta.source == "synthetic" and traces.meta.source_params == dataclasses.asdict(params)
    again, _ = generate(params)
    np.testing.assert_array_equal(traces.experts, again.experts)
    np.testing.assert_array_equal(traces.weights, again.weights)
    other, _ = generate(dataclasses.replace(params, seed=1))
    assert not np.array_equal(traces.experts, other.experts)
    # The router can be rebuilt from the trace's own metadata (the oracle relies on it).
    rebuilt = build_router(SyntheticParams(**traces.meta.source_params))
    np.testing.assert_array_equal(rebuilt.trans, router.trans)


def test_router_tables_are_consistent():
    params = SyntheticParams(num_layers=5, num_types=6)
    router = build_router(params)
    Z, L, E = 6, 5, params.num_experts
    assert router.init.shape == (Z, E) and router.trans.shape == (Z, L - 1, E, E)
    assert router.second.shape == (Z, L, E, E)
    for table in (router.init, router.trans, router.second):
        np.testing.assert_allclose(table.sum(axis=-1), 1.0)
        assert (table >= 0).all()
    # The secondary is never the primary, and it depends on the type.
    assert (router.second[..., np.arange(E), np.arange(E)] == 0).all()
    assert np.abs(router.second[0] - router.second[1]).max() > 0.1
    # The type prior depends on position, unless position_effect is 0.
    pos = np.array([0.0, 1.0])
    assert np.abs(np.diff(router.type_prior(pos), axis=0)).max() > 1e-3
    flat = build_router(dataclasses.replace(params, position_effect=0.0))
    np.testing.assert_allclose(flat.type_prior(pos)[0], flat.type_prior(pos)[1])


def test_gate_weights_are_sorted_and_type_independent():
    traces, _ = generate(SyntheticParams(num_sequences=32, tokens_per_sequence=64, num_layers=4))
    w = traces.weights
    assert (np.diff(w, axis=1) <= 0).all()
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-5)
    # Independent of the primary (hence of the type): the top weight's mean barely moves with it.
    primary = traces.experts[:, 0]
    means = [w[primary == e, 0].mean() for e in np.unique(primary) if (primary == e).sum() > 200]
    assert max(means) - min(means) < 0.03


def test_calibrated_to_published_mixtral_ladder():
    """The lookup ladder lands within 3 points of the published Mixtral-8x7B figures.

    Checked on a large sample, the seed's scale (680 sequences of 64 tokens, about the published
    1.37M samples): train on 600 sequences, test on 80 held-out ones (160k samples). The deepest
    table gains with data, so this is the harder end. Top-1 is held to the same 3 points.
    """
    params = default_params(num_sequences=680)
    order = np.random.default_rng(0).permutation(params.num_sequences)
    measured = ladder_accuracy(params, [order[:80]])
    for name, (top1, top2) in PUBLISHED.items():
        got1, got2 = measured[name]
        assert abs(got2 - top2) <= TOLERANCE, f"{name}: top-2 {got2:.3f} vs published {top2}"
        assert abs(got1 - top1) <= TOLERANCE, f"{name}: top-1 {got1:.3f} vs published {top1}"
    # The ladder climbs, and each level beats the per-layer frequency.
    top2 = [measured[n][1] for n in ("frequency", "lookup_1", "lookup_2", "lookup_3")]
    assert top2 == sorted(top2)


def test_calibration_holds_at_the_default_size():
    """The default size (384 sequences of 32 tokens), as the pipeline sees it: ~360 train sequences
    per fold. Three folds of 24 held-out sequences (~24k samples each): a check of top-2 only."""
    params = default_params()
    order = np.random.default_rng(0).permutation(params.num_sequences)
    measured = ladder_accuracy(params, [order[i:i + 24] for i in (0, 24, 48)])
    for name, (_, top2) in PUBLISHED.items():
        assert abs(measured[name][1] - top2) <= TOLERANCE, f"{name}: top-2 {measured[name][1]:.3f} vs {top2}"


@pytest.mark.parametrize("spec_noise", [None, 0.5])
def test_spec_logits_only_when_asked(spec_noise):
    traces, _ = generate(SyntheticParams(num_sequences=2, tokens_per_sequence=16, num_layers=4, spec_noise=spec_noise))
    assert (traces.spec_logits is None) == (spec_noise is None)
    if spec_noise is not None:
        assert traces.spec_logits.shape == (len(traces), traces.meta.num_experts)


# The previous token's top-2 at a layer holds this token's primary there: 44.5% of the pairs of
# consecutive decode tokens in the shared Mixtral-8x7B log (10,715 pairs; 39.3% and 46.2% in its
# two problems), 25% by chance with 8 experts. test_prev_token_statistic_of_the_shared_log measures it.
MIXTRAL_PREV_TOKEN_HIT = 0.445


def prev_token_hit_rate(seq_id: np.ndarray, token_pos: np.ndarray, layer: np.ndarray, experts: np.ndarray) -> float:
    """Share of (token, layer) rows whose primary is among the previous token's top-k at that layer."""
    rows = {(int(s), int(t), int(l)): e for s, t, l, e in zip(seq_id, token_pos, layer, experts.tolist())}
    pairs = [(e[0], rows[(s, t - 1, l)]) for (s, t, l), e in rows.items() if (s, t - 1, l) in rows]
    return float(np.mean([primary in prev for primary, prev in pairs]))


def test_token_persistence_reproduces_the_mixtral_logs_previous_token_statistic():
    """route_persistence (the default's) makes consecutive tokens' routing agree as often as in the
    real decode log; without it the generator is at chance (25% with 8 experts: its types change
    every token)."""
    traces, _ = generate(default_params(num_sequences=48))
    measured = prev_token_hit_rate(traces.seq_id, traces.token_pos, traces.layer, traces.experts)
    assert abs(measured - MIXTRAL_PREV_TOKEN_HIT) < 0.02, measured
    plain, _ = generate(default_params(num_sequences=48, route_persistence=0.0))
    assert abs(prev_token_hit_rate(plain.seq_id, plain.token_pos, plain.layer, plain.experts) - 0.25) < 0.02


def test_prev_token_statistic_of_the_shared_log(shared_traces):
    """Where MIXTRAL_PREV_TOKEN_HIT comes from: the shared Mixtral log, read as it is."""
    import json

    rows = [json.loads(line) for line in (shared_traces / "mixtral-8x7b-instruct" /
                                          "humaneval_2_routing.jsonl").read_text().splitlines()]
    measured = prev_token_hit_rate(np.array([r["problem_id"] for r in rows]), np.array([r["token_idx"] for r in rows]),
                                   np.array([r["layer"] for r in rows]), np.array([r["experts"] for r in rows]))
    assert round(measured, 3) == MIXTRAL_PREV_TOKEN_HIT
