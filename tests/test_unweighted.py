"""Traces of unordered sets without weights (the DeepSeek-V2-Lite log): stored with null weights and
ascending sets, read back with uniform weights; the token's text kept; the features' token key
and content hash; `train.target: auto`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from routecast.config.fields import ParamsError
from routecast.config.params import FeaturesParams, TrainParams
from routecast.data.features import encode_features, text_keys
from routecast.data.traces import TraceError, TraceMeta, Traces, read_traces, write_traces
from routecast.errors import InputError


def set_traces(experts: list[list[list[int]]], texts: list[list[str]] | None = None,
               seq_ids: list[int] | None = None) -> Traces:
    """experts[s][t] = the (layer 0, layer 1) sets of token t of sequence s, each a list of k=2 lists."""
    rows = []
    for s, sequence in enumerate(experts):
        for t, layers in enumerate(sequence):
            for layer, chosen in enumerate(layers):
                text = texts[s][t] if texts else None
                rows.append(((seq_ids or range(len(experts)))[s], t, layer, chosen, text))
    seq, pos, layer, chosen, text = zip(*rows)
    return Traces(TraceMeta(2, 6, 2, source="test", weighted=False), np.array(seq, np.int32), np.array(pos, np.int32),
                  np.array(layer, np.int16), np.array(chosen, np.int16), np.full((len(seq), 2), 0.5, np.float32),
                  token_text=np.array(text, dtype=object) if texts else None)


def test_round_trip_keeps_sets_and_text_and_stores_no_weights(tmp_path: Path) -> None:
    traces = set_traces([[[[0, 3], [1, 5]], [[2, 4], [0, 1]]]], texts=[["Ġa", 'x,"y']])
    write_traces(tmp_path / "t.parquet", traces)
    table = pq.read_table(tmp_path / "t.parquet")
    assert table.column("weights").null_count == len(table)  # nothing stored where a log has nothing
    back = read_traces(tmp_path / "t.parquet")
    assert back.meta.weighted is False
    np.testing.assert_array_equal(back.experts, traces.experts)
    np.testing.assert_array_equal(back.weights, np.full((4, 2), 0.5, np.float32))
    assert back.token_text.tolist() == ["Ġa", "Ġa", 'x,"y', 'x,"y']


def test_a_set_not_in_ascending_order_is_refused(tmp_path: Path) -> None:
    traces = set_traces([[[[3, 0], [1, 5]]]])
    with pytest.raises(TraceError, match=r"row 0: experts \[3, 0\]: an unweighted trace stores each set in ascending"):
        write_traces(tmp_path / "t.parquet", traces)
    assert not (tmp_path / "t.parquet").exists()


def test_token_keys_are_stable_hashes_of_the_text() -> None:
    keys = text_keys(np.array(["Ġthe", "Ġthe", "x"], dtype=object))
    assert keys[0] == keys[1] != keys[2] and (keys >= 0).all()
    # blake2b-64 of the UTF-8 bytes, shifted to 63 bits: the same in every run and every trace
    import hashlib

    assert keys[2] == int.from_bytes(hashlib.blake2b(b"x", digest_size=8).digest(), "little") >> 1


def test_copies_of_a_prompt_share_a_content_hash_and_the_token_feature() -> None:
    a = [[[0, 3], [1, 5]], [[2, 4], [0, 1]]]
    b = [[[1, 3], [1, 5]], [[2, 4], [0, 1]]]
    texts = [["p", "q"], ["p", "q"], ["p", "r"]]
    feats = encode_features(set_traces([a, a, b], texts=texts, seq_ids=[7, 9, 11]), FeaturesParams(token=True))
    content = {int(s): int(c) for s, c in zip(feats.seq_id, feats.content)}
    assert content[7] == content[9] != content[11]  # by the tokens: 11 differs in its second token
    np.testing.assert_array_equal(feats.token[feats.seq_id == 7], text_keys(np.array(["p", "q"], dtype=object)))
    np.testing.assert_array_equal(feats.current_set[feats.seq_id == 11], [[1, 3], [2, 4]])
    # without text, the routing decides: 7 and 9 route alike, 11 does not
    routed = encode_features(set_traces([a, a, b], seq_ids=[7, 9, 11]), FeaturesParams())
    by_seq = {int(s): int(c) for s, c in zip(routed.seq_id, routed.content)}
    assert by_seq[7] == by_seq[9] != by_seq[11]
    with pytest.raises(InputError, match="features.token: the trace has neither token ids nor token text"):
        encode_features(set_traces([a]), FeaturesParams(token=True))


def test_target_auto_is_the_set_without_weights_and_primary_is_refused() -> None:
    assert TrainParams().for_samples(weighted=False).target == "set"
    assert TrainParams().for_samples(weighted=True).target == "primary"
    assert TrainParams(target="set").for_samples(weighted=True).target == "set"
    with pytest.raises(ParamsError, match="train.target: primary: this trace has no primary expert"):
        TrainParams(target="primary").for_samples(weighted=False)
