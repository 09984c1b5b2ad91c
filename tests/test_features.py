"""Features: exactly what is known at layer l, nothing from the target layer; drops counted."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from routecast.config.params import FeaturesParams, SyntheticParams
from routecast.data.features import encode_features, read_features, write_features
from routecast.data.traces import TraceError, Traces
from routecast.sources.synthetic import generate


@pytest.fixture(scope="module")
def traces() -> Traces:
    return generate(SyntheticParams(num_sequences=4, tokens_per_sequence=30, num_layers=6, spec_noise=1.0))[0]


def test_sample_count_order_and_target(traces: Traces) -> None:
    feats = encode_features(traces, FeaturesParams())
    L = traces.meta.num_layers
    assert len(feats) == 4 * 30 * (L - 1) and feats.report["dropped_missing_layer"] == 0
    grid = traces.experts.reshape(4 * 30, L, 2)
    assert np.array_equal(feats.target.reshape(-1, L - 1), grid[:, 1:, 0])
    assert np.array_equal(feats.target_set.reshape(-1, L - 1, 2), grid[:, 1:])
    assert np.array_equal(feats.secondary.reshape(-1, L - 1), grid[:, :-1, 1])
    assert np.array_equal(feats.layer[: L - 1], np.arange(L - 1))


def test_history_holds_layers_up_to_l_only(traces: Traces) -> None:
    feats = encode_features(traces, FeaturesParams())
    L = traces.meta.num_layers
    grid = traces.experts.reshape(-1, L, 2)[:, :, 0].astype(np.int64) + 1
    for i in range(0, len(feats), 7):
        token, layer = divmod(i, L - 1)
        expected = np.where(np.arange(L) <= layer, grid[token], 0)
        assert np.array_equal(feats.history[i], expected), i
        # No leak: the target layer's entry is padding.
        assert feats.history[i, layer + 1] == 0


def test_history_len_truncates_and_position_clips(traces: Traces) -> None:
    feats = encode_features(traces, FeaturesParams(history_len=3, position_scale=10.0))
    assert feats.history.shape[1] == 3
    assert feats.position.max() == 1.0 and feats.position.min() == 0.0
    assert np.allclose(feats.position, np.minimum(feats.token_pos / 10.0, 1.0))


def test_missing_rows_drop_samples_and_are_counted(traces: Traces) -> None:
    drop = (traces.layer == 2) & (traces.token_pos == 5)
    t = Traces(traces.meta, traces.seq_id[~drop], traces.token_pos[~drop], traces.layer[~drop],
               traces.experts[~drop], traces.weights[~drop], None, traces.spec_logits[~drop])
    feats = encode_features(t, FeaturesParams())
    # Each missing row costs the sample at that layer and the one that targets it.
    assert feats.report["dropped_missing_layer"] == 4 and feats.report["dropped_missing_target"] == 4
    assert len(feats) == 4 * 30 * 5 - 8


def test_duplicate_rows_are_an_error(traces: Traces) -> None:
    t = Traces(traces.meta, *(np.concatenate([a, a[:1]]) for a in
                              (traces.seq_id, traces.token_pos, traces.layer, traces.experts, traces.weights)))
    with pytest.raises(TraceError, match="duplicate rows for seq_id=0, token_pos=0, layer=0"):
        encode_features(t, FeaturesParams())


def test_parquet_round_trip(traces: Traces, tmp_path: Path) -> None:
    feats = encode_features(traces, FeaturesParams())
    write_features(tmp_path / "f.parquet", feats)
    back = read_features(tmp_path / "f.parquet")
    assert back.meta == feats.meta
    for name in ("layer", "secondary", "gating", "history", "position", "target", "target_set", "spec_logits"):
        assert np.array_equal(getattr(back, name), getattr(feats, name)), name


def test_read_features_in_batches_and_of_no_rows(traces: Traces, tmp_path: Path, monkeypatch) -> None:
    """read_features decodes a few rows at a time (so memory stays bounded); the pieces join back
    into the same columns, and a file of no samples reads back as empty columns of the right width."""
    import routecast.data.features as features_module

    feats = encode_features(traces, FeaturesParams())
    write_features(tmp_path / "f.parquet", feats)
    monkeypatch.setattr(features_module, "_READ_BATCH", 7)
    back = read_features(tmp_path / "f.parquet")
    for name in ("seq_id", "layer", "gating", "history", "target_set", "current_set", "content"):
        assert np.array_equal(getattr(back, name), getattr(feats, name)), name
    write_features(tmp_path / "empty.parquet", feats.take(np.zeros(0, dtype=np.int64)))
    empty = read_features(tmp_path / "empty.parquet")
    assert len(empty) == 0 and empty.history.shape == (0, feats.history.shape[1])
    assert empty.target_set.shape == (0, feats.meta.top_k)


def test_samples_read_from_parquet_become_tensors_without_a_warning(traces: Traces, tmp_path: Path) -> None:
    """`torch.from_numpy` warns on a read-only array (every training run once printed it). The
    columns read_features returns are NumPy's own, writable (copied out of Arrow, whose memory goes
    back at once), and sample_inputs shares nothing read-only with torch."""
    from routecast.data.batches import sample_inputs

    feats = encode_features(traces, FeaturesParams(prev_token=True))
    write_features(tmp_path / "f.parquet", feats)
    back = read_features(tmp_path / "f.parquet")
    assert all(getattr(back, name).flags.writeable for name in ("gating", "history", "spec_logits", "prev_experts"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inputs = sample_inputs(back, use_prev=True, use_extra=True)
    assert np.array_equal(inputs.gating.numpy(), feats.gating)
    assert np.array_equal(inputs.extra.numpy(), feats.spec_logits)
    assert np.array_equal(inputs.prev.numpy(), feats.prev_experts)
