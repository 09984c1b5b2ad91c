"""The vectorised encoder equals the per-row reference encoder, on every path it takes:
complete and in order (no sort, no scatter), in order with missing rows, and shuffled."""

from __future__ import annotations

from dataclasses import fields, replace

import numpy as np
import pytest

from reference_encoder import encode_features_reference
from routecast.config.params import NEXT_TOKEN, FeaturesParams, SyntheticParams
from routecast.data.features import Features, encode_features
from routecast.data.traces import TraceError, Traces
from routecast.errors import InputError
from routecast.sources.synthetic import generate


def small_trace(spec: bool, num_sequences: int = 4, tokens: int = 9, layers: int = 6) -> Traces:
    traces, _ = generate(SyntheticParams(num_sequences=num_sequences, tokens_per_sequence=tokens, num_layers=layers,
                                         num_experts=8, top_k=2, spec_noise=0.5 if spec else None, seed=3))
    return traces


def subset(traces: Traces, rows: np.ndarray) -> Traces:
    return replace(traces, **{f.name: getattr(traces, f.name)[rows] for f in fields(traces)
                              if isinstance(getattr(traces, f.name), np.ndarray)})


def assert_same(got: Features, want: Features) -> None:
    assert got.meta == want.meta
    for f in fields(Features):
        a, b = getattr(got, f.name), getattr(want, f.name)
        if f.name in ("meta", "report", "is_val"):
            continue
        if b is None:
            assert a is None, f.name
            continue
        assert a.dtype == b.dtype, (f.name, a.dtype, b.dtype)
        assert a.shape == b.shape, (f.name, a.shape, b.shape)
        np.testing.assert_array_equal(a, b, err_msg=f.name)


def expected_report(traces: Traces, params: FeaturesParams) -> dict[str, int]:
    L, la = traces.meta.num_layers, params.lookahead
    layers: dict[tuple[int, int], set[int]] = {}
    for s, p, layer in zip(traces.seq_id.tolist(), traces.token_pos.tolist(), traces.layer.tolist()):
        layers.setdefault((s, p), set()).add(layer)
    miss_layer = sum(1 for have in layers.values() for l in range(L - la) if l not in have)
    miss_target = sum(1 for have in layers.values() for l in range(L - la) if l in have and l + la not in have)
    return {"trace_rows": len(traces), "tokens": len(layers), "candidate_samples": len(layers) * (L - la),
            "dropped_missing_layer": miss_layer, "dropped_missing_target": miss_target,
            "history_entries_missing": sum(1 for have in layers.values() for l in range(L - 1) if l not in have)}


PARAMS = [FeaturesParams(), FeaturesParams(horizons=[2], history_len=4, prev_token=True),
          FeaturesParams(history_len=9, horizons=[1], prev_token=True),
          FeaturesParams(horizons=[2], position_scale=4.0), FeaturesParams(horizons=[1, 2, 4], history_len=5),
          FeaturesParams(next_token=True), FeaturesParams(horizons=[2, 3], next_token=True)]


@pytest.mark.parametrize("spec", [False, True])
@pytest.mark.parametrize("layout", ["complete", "missing", "shuffled_missing", "shuffled_complete"])
@pytest.mark.parametrize("params", PARAMS,
                         ids=lambda p: f"la{'_'.join(map(str, p.horizons))}_h{p.history_len}_prev{int(p.prev_token)}"
                                           f"_next{int(p.next_token)}")
def test_vectorised_equals_reference(spec: bool, layout: str, params: FeaturesParams) -> None:
    traces = small_trace(spec)
    rng = np.random.default_rng(7)
    rows = np.arange(len(traces))
    if "missing" in layout:
        rows = rows[rng.random(len(rows)) > 0.15]  # drop ~15% of (token, layer) rows
    if "shuffled" in layout:
        rows = rng.permutation(rows)
    traces = subset(traces, rows)
    got = encode_features(traces, params)
    want = encode_features_reference(traces, params)
    assert len(want) > 0
    assert_same(got, want)
    report = expected_report(traces, params)
    assert {k: got.report[k] for k in report} == report
    assert got.report["samples"] == len(want)


def test_features_do_not_alias_the_trace() -> None:
    traces = small_trace(False, num_sequences=1, tokens=1)
    feats = encode_features(traces, FeaturesParams())
    for f in fields(Features):
        a = getattr(feats, f.name)
        if isinstance(a, np.ndarray):
            for g in fields(Traces):
                b = getattr(traces, g.name)
                if isinstance(b, np.ndarray):
                    assert not np.shares_memory(a, b), (f.name, g.name)


@pytest.mark.parametrize("shuffled", [False, True])
def test_duplicate_rows_are_rejected(shuffled: bool) -> None:
    traces = small_trace(False)
    rows = np.concatenate([np.arange(len(traces)), [5]])
    rows = np.sort(rows) if not shuffled else np.random.default_rng(0).permutation(rows)
    with pytest.raises(TraceError, match="duplicate rows"):
        encode_features(subset(traces, rows), FeaturesParams())


def test_a_horizon_past_the_last_layer_is_refused_naming_it() -> None:
    with pytest.raises(InputError, match=r"features.horizons=\[1, 6\]: horizon 6 is past the last layer .* 6 layers"):
        encode_features(small_trace(False), FeaturesParams(horizons=[1, 6]))


def test_at_horizon_is_the_samples_with_a_target_there() -> None:
    """`at_horizon(d)` keeps the samples whose layer l + d is routed, with that layer's top-k as the
    target: with a trace row missing, the same samples as encoding with `horizons: [d]` alone
    (here no sample lacks l + 1 but has l + d); the main horizon is the samples as they are."""
    traces = small_trace(False)
    traces = subset(traces, np.delete(np.arange(len(traces)), 4))  # the first token's layer 4
    feats = encode_features(traces, FeaturesParams(horizons=[1, 3]))
    assert feats.at_horizon(1).target is feats.target and feats.at_horizon(1).horizon_set is None
    ahead = feats.at_horizon(3)
    assert_same(ahead, encode_features(traces, FeaturesParams(horizons=[3])))
    assert 0 < len(ahead) < len(feats)
    with pytest.raises(ValueError, match=r"horizon 2 is not one of the features' targets \['1', '3'\]"):
        feats.at_horizon(2)


def test_the_next_token_target_is_the_next_position_at_the_same_layer() -> None:
    """`features.next_token`: `at_horizon(NEXT_TOKEN)` keeps the samples whose token has a next
    token in its sequence routed at the sample's layer, with that token's top-k there as the target
    (each sequence's last token has none), and reads as the layer l + 0 of the next token."""
    traces = small_trace(False)
    feats = encode_features(traces, FeaturesParams(next_token=True))
    assert feats.meta.horizons == (1, NEXT_TOKEN) and feats.horizon_set.shape[1] == 2
    nxt = feats.at_horizon(NEXT_TOKEN)
    assert nxt.meta.lookahead == NEXT_TOKEN and 0 < len(nxt) < len(feats)
    by_key = {(s, p, layer): i for i, (s, p, layer) in enumerate(zip(feats.seq_id, feats.token_pos, feats.layer))}
    for i in range(len(nxt)):
        j = by_key[(nxt.seq_id[i], nxt.token_pos[i] + 1, nxt.layer[i])]  # that token's sample at the same layer
        np.testing.assert_array_equal(nxt.target_set[i], feats.current_set[j])
        assert nxt.target[i] == feats.primary[j]
    last = np.array([(s, p + 1, layer) not in by_key
                     for s, p, layer in zip(feats.seq_id, feats.token_pos, feats.layer)])
    assert len(nxt) == int((~last).sum())  # every sample without a next token is left out, and only those
    with pytest.raises(ValueError, match=r"horizon next_token is not one of the features' targets \['1'\]"):
        encode_features(traces, FeaturesParams()).at_horizon(NEXT_TOKEN)
