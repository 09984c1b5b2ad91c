"""The exact Bayes-optimal predictor: its analytic accuracy matches the measured one, and no
predictor trained on the same features beats it beyond sampling error."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

from conftest import ROOT
from routecast.config.params import POSITION_SCALE, FeaturesParams, SyntheticParams, load_params
from routecast.data.features import Features, encode_features, token_keys
from routecast.data.traces import TraceMeta, Traces, read_trace_meta, write_traces
from routecast.evaluate.scoring import ranked
from routecast.predictors.oracle import (
    OraclePredictor,
    _complete_loglik,
    _forward_loglik,
    _Tables,
    expected_topk_accuracy,
    next_layer_probs,
    posterior_next_expert,
)
from routecast.predictors.references import BoostedTreesPredictor, lookup_ladder
from routecast.sources.synthetic import generate

Z_SIGMA = 4.0  # how many standard errors count as "within sampling error"


def topk_hits(scores: np.ndarray, target: np.ndarray, k: int) -> np.ndarray:
    return (ranked(scores, k) == target[:, None].astype(np.int64)).any(axis=1)


def clustered_mean_and_se(values: np.ndarray, feats: Features) -> tuple[float, float]:
    """Mean of per-sample `values` and its standard error, clustered by token (a token's samples
    share its hidden type, so they are not independent)."""
    token = token_keys(feats.seq_id, feats.token_pos)
    _, cluster = np.unique(token, return_inverse=True)
    n = len(values)
    mean = values.mean()
    sums = np.bincount(cluster, weights=values - mean)
    return float(mean), float(np.sqrt((sums ** 2).sum()) / n)


@pytest.fixture(scope="module")
def large_sample():
    """The default generator at the seed's scale (170 sequences); 150 train, 20 test sequences."""
    params = dataclasses.replace(load_params(ROOT / "params.yaml").extract.synthetic, num_sequences=170)
    traces, router = generate(params)
    feats = encode_features(traces, FeaturesParams())
    test_seqs = np.random.default_rng(0).permutation(params.num_sequences)[:20]
    held = np.isin(feats.seq_id, test_seqs)
    test = feats.take(held)
    oracle = OraclePredictor.from_trace_meta(traces.meta).fit(feats.take(~held))
    return feats.take(~held), test, oracle.scores(test)


def test_oracle_analytic_accuracy_matches_measured(large_sample):
    _, test, probs = large_sample
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-9)
    for k in (1, 2):
        measured, se = clustered_mean_and_se(topk_hits(probs, test.target, k) - np.sort(probs, axis=1)[:, -k:].sum(1),
                                             test)
        assert abs(measured) < Z_SIGMA * se, f"top-{k}: measured - analytic = {measured:.4f}, se {se:.4f}"
    # Calibrated generator: a ceiling well above the ladder (about 59 / 79).
    assert 0.70 < expected_topk_accuracy(probs, 2) < 0.88


def small_mlp_scores(train: Features, test: Features, seconds: float = 6.0) -> np.ndarray:
    """A small MLP on the seed's features (one-hot ids, gating, position), trained for a few seconds."""
    import torch

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a small model on a busy 2-core machine: one thread is the fastest
    L, E = train.meta.num_layers, train.meta.num_experts

    def inputs(f: Features) -> torch.Tensor:
        n, H = f.history.shape
        ids = np.column_stack([f.layer, f.secondary.astype(np.int64) + 1 + L, f.history.astype(np.int64)
                               + L + (E + 1) * np.arange(1, H + 1)])  # each id in its own one-hot block
        x = np.zeros((n, L + (E + 1) * (H + 1) + f.gating.shape[1] + 1), dtype=np.float32)
        x[np.arange(n)[:, None], ids] = 1.0
        x[:, -f.gating.shape[1] - 1:-1] = f.gating
        x[:, -1] = f.position
        return torch.from_numpy(x)

    train = train.take(np.random.default_rng(0).permutation(len(train))[:200_000])  # one-hot inputs are wide
    X, y = inputs(train), torch.from_numpy(train.target.astype(np.int64))
    model = torch.nn.Sequential(torch.nn.Linear(X.shape[1], 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                                torch.nn.ReLU(), torch.nn.Linear(256, E))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    start, step = time.perf_counter(), 0
    order = torch.randperm(len(y))
    while time.perf_counter() - start < seconds:
        idx = order[(step * 1024) % len(y):][:1024]
        loss = torch.nn.functional.cross_entropy(model(X[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
    with torch.no_grad():
        scores = model(inputs(test)).numpy()
    torch.set_num_threads(threads)
    return scores


def test_nothing_beats_the_oracle(large_sample):
    """Paired per sample: predictor hit minus oracle hit, mean below Z_SIGMA clustered standard errors."""
    train, test, probs = large_sample
    oracle_hits = topk_hits(probs, test.target, 2).astype(float)
    contenders, seconds = {}, {}
    for name, fit_and_score in [
        *((p.name, lambda p=p: p.fit(train).scores(test)) for p in lookup_ladder(3)),
        ("boosted_trees", lambda: BoostedTreesPredictor(max_iter=25).fit(train).scores(test)),
        ("mlp", lambda: small_mlp_scores(train, test)),
    ]:
        start = time.perf_counter()
        contenders[name] = fit_and_score()
        seconds[name] = time.perf_counter() - start
    print("fit+score seconds:", {n: round(s, 1) for n, s in seconds.items()})
    for name, scores in contenders.items():
        gain, se = clustered_mean_and_se(topk_hits(scores, test.target, 2) - oracle_hits, test)
        assert gain < Z_SIGMA * se, f"{name} beats the oracle by {gain:.4f} (se {se:.4f})"
        assert gain < -0.05, f"{name} comes within 5 points of the oracle ({gain:.4f}): is the ceiling real?"


def small_features(params: SyntheticParams, features: FeaturesParams, drop: float = 0.0) -> tuple[Features, object]:
    traces, router = generate(params)
    if drop:  # real logs miss rows: drop some, as the Mixtral recorder did
        keep = np.random.default_rng(1).random(len(traces)) >= drop
        traces = Traces(traces.meta, traces.seq_id[keep], traces.token_pos[keep], traces.layer[keep],
                        traces.experts[keep], traces.weights[keep])
    return encode_features(traces, features), router


def test_forward_algorithm_equals_closed_form():
    feats, router = small_features(SyntheticParams(num_sequences=4, tokens_per_sequence=64, num_layers=10),
                                   FeaturesParams())
    order = np.argsort(-feats.layer.astype(np.int64), kind="stable")
    f = feats.take(order)
    args = (f.layer.astype(np.int64), f.history.astype(np.int64), f.primary.astype(np.int64),
            f.secondary.astype(np.int64))
    tables = _Tables(router, 1)
    np.testing.assert_allclose(_forward_loglik(tables, *args), _complete_loglik(tables, *args), rtol=1e-10)


@pytest.mark.parametrize("features, drop, persistence", [
    (FeaturesParams(horizons=[2]), 0.0, 0.0),
    (FeaturesParams(history_len=5), 0.0, 0.0),
    (FeaturesParams(), 0.1, 0.0),
    (FeaturesParams(), 0.0, 0.4),
    (FeaturesParams(prev_token=True), 0.0, 0.4),
    (FeaturesParams(prev_token=True, horizons=[2], history_len=5), 0.1, 0.4),
])
def test_oracle_exact_for_lookahead_truncated_missing_history_and_persistence(features, drop, persistence):
    """Calibration: a predictor whose scores are the true P(target | features) scores, on average,
    the probability mass of its own top-2 (primary) and of its own top-k set (set recall)."""
    params = SyntheticParams(num_sequences=60, tokens_per_sequence=64, num_layers=8, route_persistence=persistence)
    feats, router = small_features(params, features, drop)
    probs = posterior_next_expert(router, feats)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-9)
    residual, se = clustered_mean_and_se(topk_hits(probs, feats.target, 2) - np.sort(probs, axis=1)[:, -2:].sum(1),
                                         feats)
    assert abs(residual) < Z_SIGMA * se, (residual, se)
    inclusion = next_layer_probs(router, feats, target="set")
    np.testing.assert_allclose(inclusion.sum(axis=1), 2.0, atol=1e-9)  # top_k = 2 members
    best = np.argsort(-inclusion, axis=1, kind="stable")[:, :2]
    covered = (best[:, :, None] == feats.target_set[:, None, :]).any(axis=2).sum(axis=1)
    expected = np.take_along_axis(inclusion, best, axis=1).sum(axis=1)
    residual, se = clustered_mean_and_se(covered - expected, feats)
    assert abs(residual) < Z_SIGMA * se, ("set", residual, se)


def test_previous_token_feature_is_informative_only_with_persistence():
    """With persistence the previous token's experts raise the ceiling; without it they change nothing."""
    for persistence, gain in ((0.0, False), (0.4, True)):
        params = SyntheticParams(num_sequences=40, tokens_per_sequence=64, num_layers=8, route_persistence=persistence)
        traces, router = generate(params)
        plain = posterior_next_expert(router, encode_features(traces, FeaturesParams()))
        with_prev = posterior_next_expert(router, encode_features(traces, FeaturesParams(prev_token=True)))
        if gain:
            assert expected_topk_accuracy(with_prev) > expected_topk_accuracy(plain) + 0.05
        else:
            np.testing.assert_allclose(with_prev, plain, atol=1e-9)


def test_oracle_uses_position_like_the_generator():
    """A different position_scale in the features must not change the oracle (it reads the token's
    position, which position * position_scale equals below the clip), and with a strong position
    effect the position matters."""
    params = SyntheticParams(num_sequences=4, tokens_per_sequence=512, num_layers=6, position_effect=20.0)
    traces, router = generate(params)
    a = posterior_next_expert(router, encode_features(traces, FeaturesParams(position_scale=2048)))
    b = posterior_next_expert(router, encode_features(traces, FeaturesParams(position_scale=1024)))
    np.testing.assert_allclose(a, b, atol=1e-5)
    feats = encode_features(traces, FeaturesParams())
    blind = posterior_next_expert(router, dataclasses.replace(feats, token_pos=np.zeros_like(feats.token_pos)))
    assert np.abs(blind - a).max() > 0.05


def test_oracle_is_stable_on_long_sharp_chains():
    params = SyntheticParams(num_sequences=2, tokens_per_sequence=32, num_layers=96, num_types=64,
                             type_concentration=0.005, shared_weight=0.01)
    feats, router = small_features(params, FeaturesParams())
    probs = posterior_next_expert(router, feats)
    assert np.isfinite(probs).all()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-9)


def test_oracle_from_trace_metadata(tmp_path):
    params = SyntheticParams(num_sequences=3, tokens_per_sequence=16, num_layers=5, seed=7)
    traces, router = generate(params)
    write_traces(tmp_path / "traces.parquet", traces)
    meta = read_trace_meta(tmp_path / "traces.parquet")
    feats = encode_features(traces, FeaturesParams())
    oracle = OraclePredictor.from_trace_meta(meta)
    assert oracle.name == "oracle"
    np.testing.assert_array_equal(oracle.scores(feats), posterior_next_expert(router, feats))
    with pytest.raises(ValueError, match="synthetic"):
        OraclePredictor.from_trace_meta(TraceMeta(5, 8, 2, source="import"))


def every_path(router) -> tuple[np.ndarray, np.ndarray]:
    """Every path of primaries through the layers ([E^L, L]) and its probability under each type ([Z, E^L])."""
    import itertools

    L, E = router.params.num_layers, router.params.num_experts
    paths = np.array(list(itertools.product(range(E), repeat=L)))
    path_prob = router.init[:, paths[:, 0]]
    for j in range(L - 1):
        path_prob = path_prob * router.trans[:, j, paths[:, j], paths[:, j + 1]]
    return paths, path_prob


def brute_force_probs(router, feats: Features) -> tuple[np.ndarray, np.ndarray]:
    """P(primary at layer l + d = e | features) and P(e in the top-2 there | features), d =
    `feats.meta.lookahead`, by summing the generator's joint probability over every hidden type and
    every path of primaries (E^L of them): no closed form, no forward algorithm."""
    p = router.params
    Z, E = p.num_types, p.num_experts
    d = feats.meta.lookahead
    paths, path_prob = every_path(router)
    primary = np.zeros((len(feats), E))
    member = np.zeros((len(feats), E))
    for i in range(len(feats)):
        layer, pos = int(feats.layer[i]), int(feats.token_pos[i])
        seen = feats.history[i, :layer + 1].astype(np.int64) - 1
        fits = (paths[:, :layer + 1] == seen).all(axis=1)
        prior = router.type_prior(np.array([min(pos / POSITION_SCALE, 1.0)]))[0]  # [Z]
        w = prior[:, None] * path_prob[:, fits] * router.second[:, layer, seen[-1], feats.secondary[i]][:, None]
        w /= w.sum()
        ahead = paths[fits, layer + d]
        for z in range(Z):
            np.add.at(primary[i], ahead, w[z])
            # the secondary at layer l + d given its primary a: second[z, l + d, a, e]
            np.add.at(member[i], ahead, w[z])
            member[i] += (w[z][:, None] * router.second[z, layer + d, ahead]).sum(axis=0)
    return primary, member


@pytest.mark.parametrize("horizon", [1, 2, 3])
def test_oracle_exact_at_every_horizon_by_brute_force(horizon: int) -> None:
    """On a generator small enough to enumerate (3 types, 4 layers, 3 experts), the oracle's
    P(primary at l + d) and P(e in the top-2 at l + d) equal the sums over every hidden path, at
    every horizon d of `features.horizons` (read through `Features.at_horizon`)."""
    params = SyntheticParams(num_sequences=2, tokens_per_sequence=6, num_layers=4, num_experts=3, num_types=3,
                             type_concentration=0.5, position_effect=3.0, seed=5)
    traces, router = generate(params)
    feats = encode_features(traces, FeaturesParams(horizons=[1, 2, 3])).at_horizon(horizon)
    assert len(feats) == 12 * (4 - horizon) and feats.meta.lookahead == horizon
    want_primary, want_set = brute_force_probs(router, feats)
    np.testing.assert_allclose(next_layer_probs(router, feats, target="primary"), want_primary, atol=1e-10)
    np.testing.assert_allclose(next_layer_probs(router, feats, target="set"), want_set, atol=1e-10)
    np.testing.assert_array_equal(feats.target, traces.experts.reshape(12, 4, 2)[:, horizon:, 0].ravel())


def brute_force_next_token(router, feats: Features) -> tuple[np.ndarray, np.ndarray]:
    """P(the next token's primary at layer l = e) and P(e in its top-2 there) by summing over its two
    branches: it repeats this token's routing (weight rho: this token's experts at l), or it draws
    afresh, summed over every type (its prior at the next position) and every path of primaries."""
    p = router.params
    Z, E, rho = p.num_types, p.num_experts, p.route_persistence
    paths, path_prob = every_path(router)
    primary = np.zeros((len(feats), E))
    member = np.zeros((len(feats), E))
    for i in range(len(feats)):
        layer, pos = int(feats.layer[i]), int(feats.token_pos[i])
        prior = router.type_prior(np.array([min((pos + 1) / POSITION_SCALE, 1.0)]))[0]
        for z in range(Z):
            w = (1 - rho) * prior[z] * path_prob[z]  # [E^L]
            at = paths[:, layer]
            np.add.at(primary[i], at, w)
            np.add.at(member[i], at, w)
            member[i] += (w[:, None] * router.second[z, layer, at]).sum(axis=0)
        primary[i, feats.primary[i]] += rho
        member[i, feats.current_set[i].astype(np.int64)] += rho
    return primary, member


def test_oracle_exact_for_the_next_token_by_brute_force() -> None:
    """`features.next_token`: the oracle's P(the next token's primary at l) and P(e in its top-2 at l)
    equal the sums over both branches and every hidden type and path, on a generator small enough
    to enumerate, with persistence and a strong position effect (the next token's prior is its own)."""
    params = SyntheticParams(num_sequences=2, tokens_per_sequence=6, num_layers=4, num_experts=3, num_types=3,
                             type_concentration=0.5, position_effect=3.0, route_persistence=0.3, seed=5)
    traces, router = generate(params)
    feats = encode_features(traces, FeaturesParams(next_token=True)).at_horizon(0)
    assert len(feats) == 2 * 5 * 3  # every token but each sequence's last, at layers 0..2
    want_primary, want_set = brute_force_next_token(router, feats)
    np.testing.assert_allclose(next_layer_probs(router, feats, target="primary"), want_primary, atol=1e-10)
    np.testing.assert_allclose(next_layer_probs(router, feats, target="set"), want_set, atol=1e-10)


@pytest.mark.parametrize("persistence", [0.0, 0.4])
def test_next_token_oracle_is_calibrated_on_sampled_traces(persistence: float) -> None:
    """On traces sampled from the generator, the next token's true primary is in the oracle's top-2
    as often as the oracle's own top-2 mass says (a check of the formula against the sampler itself,
    independent of the brute force), and its top-2 set recall likewise."""
    params = SyntheticParams(num_sequences=80, tokens_per_sequence=48, num_layers=8, route_persistence=persistence)
    feats, router = small_features(params, FeaturesParams(next_token=True))
    nxt = feats.at_horizon(0)
    probs = next_layer_probs(router, nxt, target="primary")
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-9)
    residual, se = clustered_mean_and_se(topk_hits(probs, nxt.target, 2) - np.sort(probs, axis=1)[:, -2:].sum(1), nxt)
    assert abs(residual) < Z_SIGMA * se, (residual, se)
    inclusion = next_layer_probs(router, nxt, target="set")
    np.testing.assert_allclose(inclusion.sum(axis=1), 2.0, atol=1e-9)
    best = np.argsort(-inclusion, axis=1, kind="stable")[:, :2]
    covered = (best[:, :, None] == nxt.target_set[:, None, :]).any(axis=2).sum(axis=1)
    residual, se = clustered_mean_and_se(covered - np.take_along_axis(inclusion, best, axis=1).sum(axis=1), nxt)
    assert abs(residual) < Z_SIGMA * se, ("set", residual, se)
