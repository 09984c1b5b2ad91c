"""Splits are by sequence, seeded, and mark validation sequences inside train."""

from __future__ import annotations

import numpy as np
import pytest

from routecast.config.params import FeaturesParams, SplitParams, SyntheticParams
from routecast.data.features import encode_features
from routecast.data.split import split_features
from routecast.sources.synthetic import generate


@pytest.fixture(scope="module")
def feats():
    traces, _ = generate(SyntheticParams(num_sequences=40, tokens_per_sequence=8, num_layers=4))
    return encode_features(traces, FeaturesParams())


def test_by_sequence_is_disjoint_and_complete(feats) -> None:
    train, test = split_features(feats, SplitParams(test_fraction=0.05, val_fraction=0.1, seed=3))
    train_seqs, test_seqs = set(train.seq_id), set(test.seq_id)
    val_seqs, fit_seqs = set(train.seq_id[train.is_val]), set(train.seq_id[~train.is_val])
    assert not train_seqs & test_seqs and not val_seqs & fit_seqs
    assert len(test_seqs) == 2 and len(val_seqs) == 4  # round(40 * .05), round(38 * .1)
    assert len(train) + len(test) == len(feats)


def test_seeded(feats) -> None:
    a = split_features(feats, SplitParams(seed=1))[1]
    b = split_features(feats, SplitParams(seed=1))[1]
    c = split_features(feats, SplitParams(seed=2))[1]
    assert np.array_equal(a.seq_id, b.seq_id) and not np.array_equal(a.seq_id, c.seq_id)


def test_random_split_is_per_sample(feats) -> None:
    train, test = split_features(feats, SplitParams(by="random", seed=0))
    assert set(train.seq_id) & set(test.seq_id)  # it leaks by design
    assert len(test) == round(len(feats) * 0.05)


def test_too_few_sequences(feats) -> None:
    with pytest.raises(ValueError, match="at least 3 sequences"):
        split_features(feats.take(np.isin(feats.seq_id, [0, 1])), SplitParams())
