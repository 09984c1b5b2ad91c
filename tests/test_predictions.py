"""The predictions file (evaluate -> simulate_prefetch) and the replay built from it and the trace."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from routecast.config.params import FeaturesParams, SyntheticParams
from routecast.data.features import encode_features
from routecast.data.predictions import PredictionsError, prediction_ranks, read_predictions, write_predictions
from routecast.data.traces import Traces
from routecast.sim.prefetch import build_replay
from routecast.sources.synthetic import generate


def tiny_trace(missing: float = 0.0) -> Traces:
    traces, _ = generate(SyntheticParams(num_sequences=4, tokens_per_sequence=6, num_layers=5, num_experts=6, top_k=2))
    if missing:
        keep = np.random.default_rng(0).random(len(traces)) >= missing
        keep[traces.layer == 0] = True  # the writer wants every layer present somewhere; keep it simple
        traces = Traces(traces.meta, traces.seq_id[keep], traces.token_pos[keep], traces.layer[keep],
                        traces.experts[keep], traces.weights[keep])
    return traces


def rankings_for(test, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    r = prediction_ranks(test.meta.num_experts)
    return {"alpha": np.stack([rng.permutation(test.meta.num_experts)[:r] for _ in range(len(test))]),
            "beta": np.tile(np.arange(r), (len(test), 1))}


def test_round_trip(tmp_path: Path) -> None:
    test = encode_features(tiny_trace(), FeaturesParams())
    rankings = rankings_for(test)
    path = tmp_path / "predictions.parquet"
    write_predictions(path, test, rankings)
    got = read_predictions(path)
    assert list(got.rankings) == ["alpha", "beta"]
    assert (got.meta.num_layers, got.meta.num_experts, got.meta.top_k, got.meta.lookahead) == (5, 6, 2, 1)
    np.testing.assert_array_equal(got.seq_id, test.seq_id)
    np.testing.assert_array_equal(got.token_pos, test.token_pos)
    np.testing.assert_array_equal(got.layer, test.layer)
    for name, ranks in rankings.items():
        np.testing.assert_array_equal(got.rankings[name], ranks)
        assert got.rankings[name].dtype == np.int16
    schema = pq.read_schema(path)
    assert schema.field("pred.alpha").type == pa.list_(pa.int16(), 6) and schema.field("layer").type == pa.int16()
    assert json.loads(schema.metadata[b"predictors"]) == ["alpha", "beta"]


@pytest.mark.parametrize(("change", "message"), [
    (lambda r: {**r, "alpha": r["alpha"][:, :3]}, r"alpha: rankings must be \[\d+ samples, R=6\]"),
    (lambda r: {**r, "alpha": np.where(r["alpha"] == 0, 6, r["alpha"])}, r"alpha: row \d+: expert ids .* out of range"),
    (lambda r: {**r, "beta": np.zeros_like(r["beta"])}, r"beta: row 0: experts .* repeat an id"),
    (lambda r: {"perfect": r["alpha"]}, r"'perfect' is empty or reserved"),
    (lambda r: {}, r"no predictor to write"),
])
def test_bad_rankings_are_refused_and_nothing_is_written(tmp_path: Path, change, message: str) -> None:
    test = encode_features(tiny_trace(), FeaturesParams())
    path = tmp_path / "predictions.parquet"
    with pytest.raises(PredictionsError, match=message):
        write_predictions(path, test, change(rankings_for(test)))
    assert not path.exists()


def _rewrite(path: Path, table: pa.Table) -> None:
    pq.write_table(table, path)


@pytest.mark.parametrize(("tamper", "message"), [
    (lambda t: t.replace_schema_metadata({k: v for k, v in t.schema.metadata.items() if k != b"top_k"}),
     r"metadata lacks top_k"),
    (lambda t: t.replace_schema_metadata({**t.schema.metadata, b"predictors": b'["alpha"]'}),
     r"prediction columns .* do not match metadata `predictors`"),
    (lambda t: t.replace_schema_metadata({**t.schema.metadata, b"predictors": b"alpha"}), r"malformed metadata"),
    (lambda t: t.set_column(t.schema.get_field_index("layer"), "layer", pa.array(t.column("layer").to_numpy()
                                                                                .astype(np.int32))),
     r"column 'layer' must be int16"),
    (lambda t: t.set_column(t.schema.get_field_index("layer"), "layer", pa.array(np.full(len(t), 4, np.int16))),
     r"row 0: layer 4 out of range"),
    (lambda t: t.drop_columns(["token_pos"]), r"missing column 'token_pos'"),
    (lambda t: pa.concat_tables([t, t.slice(0, 1)]), r"appears twice"),
])
def test_malformed_file_is_named(tmp_path: Path, tamper, message: str) -> None:
    test = encode_features(tiny_trace(), FeaturesParams())
    path = tmp_path / "predictions.parquet"
    write_predictions(path, test, rankings_for(test))
    _rewrite(path, tamper(pq.read_table(path)))
    with pytest.raises(PredictionsError, match=message) as info:
        read_predictions(path)
    assert str(path) in str(info.value)


def test_not_parquet_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "predictions.parquet"
    with pytest.raises(FileNotFoundError, match="run evaluate first"):
        read_predictions(path)
    path.write_text("seq_id,token_pos\n1,2\n")
    with pytest.raises(PredictionsError, match="not a Parquet file"):
        read_predictions(path)


def test_replay_takes_the_trace_truth_in_decode_order(tmp_path: Path) -> None:
    traces = tiny_trace(missing=0.1)
    feats = encode_features(traces, FeaturesParams())
    test = feats.take(np.isin(feats.seq_id, [3, 1]))  # two test sequences
    path = tmp_path / "predictions.parquet"
    rankings = rankings_for(test)
    write_predictions(path, test, rankings)
    replay = build_replay(traces, read_predictions(path))
    assert replay.sequences == 2 and replay.num_experts == 6 and replay.lookahead == 1
    # Tokens: sequence 1's, then 3's (the test split's order), each in token_pos order; every row of the
    # trace lands at its (token, layer); absent rows are -1.
    tokens = [(s, p) for s in (1, 3) for p in sorted(set(traces.token_pos[traces.seq_id == s].tolist()))]
    assert replay.tokens == len(tokens)
    expected = np.full((len(tokens), 5, 2), -1, dtype=np.int16)
    for row in np.flatnonzero(np.isin(traces.seq_id, [1, 3])):
        expected[tokens.index((traces.seq_id[row], traces.token_pos[row])), traces.layer[row]] = traces.experts[row]
    np.testing.assert_array_equal(replay.truth, expected)
    assert replay.missing_layers == int((expected[:, :, 0] < 0).sum()) > 0
    for i in range(len(test)):
        t = tokens.index((test.seq_id[i], test.token_pos[i]))
        np.testing.assert_array_equal(replay.rankings["alpha"][t, test.layer[i]], rankings["alpha"][i])
    assert (replay.rankings["beta"] >= 0).all(axis=2).sum() == len(test)
    assert 0 < replay.predicted_share < 1  # missing rows drop samples


def test_replay_refuses_a_trace_of_another_shape(tmp_path: Path) -> None:
    traces = tiny_trace()
    test = encode_features(traces, FeaturesParams())
    path = tmp_path / "predictions.parquet"
    write_predictions(path, test, rankings_for(test))
    other, _ = generate(SyntheticParams(num_sequences=4, tokens_per_sequence=6, num_layers=5, num_experts=7, top_k=2))
    with pytest.raises(PredictionsError, match="num_experts = 6, but traces has 7"):
        build_replay(other, read_predictions(path))
    fewer = Traces(traces.meta, *(a[traces.token_pos < 3] for a in (traces.seq_id, traces.token_pos, traces.layer,
                                                                      traces.experts, traces.weights)))
    with pytest.raises(PredictionsError, match=r"token_pos \d+, layer \d+\) has no row in traces"):
        build_replay(fewer, read_predictions(path))


def test_later_targets_round_trip_and_reach_the_replay(tmp_path: Path) -> None:
    """A predictor's rankings for later targets (`pred.<name>@h2`, `@next_token`, rows of -1 where a
    sample has no such target) round-trip, are validated (an out-of-range id names its column), and
    the replay reads each horizon's rankings at its (token, layer) for deeper prefetch."""
    traces = tiny_trace()
    test = encode_features(traces, FeaturesParams())
    rankings = rankings_for(test)
    r = prediction_ranks(test.meta.num_experts)
    ahead = rankings_for(test, seed=1)["alpha"].copy()
    ahead[test.layer >= 3] = -1  # layer l + 2 past the last of 5
    path = tmp_path / "predictions.parquet"
    write_predictions(path, test, rankings, {"alpha": {"h2": ahead, "next_token": rankings["beta"]}})
    got = read_predictions(path)
    assert set(got.targets) == {"alpha"} and list(got.targets["alpha"]) == ["h2", "next_token"]
    np.testing.assert_array_equal(got.targets["alpha"]["h2"], ahead)
    replay = build_replay(traces, got)
    assert set(replay.ahead) == {"alpha"} and set(replay.ahead["alpha"]) == {2}
    grid = replay.ahead["alpha"][2]
    assert grid.shape == replay.rankings["alpha"].shape and (grid[:, 3:] == -1).all() and (grid[:, :3] >= 0).all()
    bad = ahead.copy()
    bad[0] = np.arange(r) + 10
    with pytest.raises(PredictionsError, match="alpha@h2: row 0: expert ids"):
        write_predictions(tmp_path / "bad.parquet", test, rankings, {"alpha": {"h2": bad}})
    assert not (tmp_path / "bad.parquet").exists()
