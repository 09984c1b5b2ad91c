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
    with pytest.raises(ValueError, match="at least 3 distinct sequences"):
        split_features(feats.take(np.isin(feats.seq_id, [0, 1])), SplitParams())


def test_copies_of_a_prompt_stay_on_one_side(feats, caplog) -> None:
    """Sequences with the same content are one unit: every copy lands on its original's side."""
    content = feats.content.copy()
    seqs = np.unique(feats.seq_id)
    groups = [seqs[0:3], seqs[3:5]]  # 3 copies of one prompt, 2 of another
    for group in groups:
        content[np.isin(feats.seq_id, group)] = content[feats.seq_id == group[0]][0]
    copied = feats.take(np.arange(len(feats)))
    copied.content = content
    for seed in range(8):
        with caplog.at_level("INFO"):
            train, test = split_features(copied, SplitParams(seed=seed, test_fraction=0.3))
        for group in groups:
            in_test = np.isin(group, test.seq_id)
            assert in_test.all() or not in_test.any(), (seed, group, in_test)
            in_val = np.isin(group, train.seq_id[train.is_val])
            assert in_val.all() or not in_val.any(), (seed, group, in_val)
    assert f"{len(seqs)} sequences, 3 of them copies of another" in caplog.text


def test_no_copies_split_as_before(feats) -> None:
    """Without copies the units are the sequences in their own order: the split is unchanged."""
    plain = feats.take(np.arange(len(feats)))
    plain.content = None
    for seed in range(3):
        a, b = split_features(feats, SplitParams(seed=seed)), split_features(plain, SplitParams(seed=seed))
        assert np.array_equal(a[1].seq_id, b[1].seq_id) and np.array_equal(a[0].is_val, b[0].is_val)
