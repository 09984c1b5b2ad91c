"""Split samples into train (with validation sequences marked) and test, by sequence.

All samples of a sequence land on one side, so the test set measures generalisation to unseen
prompts. Copies of one prompt (real logs repeat some: sequences whose `content` hash is equal) are
one unit: they land on the same side, and their number is logged. `split.by: random` splits per
sample instead; it leaks (a token's other layers sit in train) and exists only to reproduce the
seed's random-split figure.
"""

from __future__ import annotations

import logging

import numpy as np

from routecast.config.params import SplitParams
from routecast.data.features import Features
from routecast.errors import InputError

log = logging.getLogger(__name__)


def _held_out(n: int, fraction: float) -> int:
    """How many of `n` units to hold out: round(n * fraction), at least 1, leaving at least 1."""
    if n < 2:
        raise InputError(f"cannot split {n} unit(s): need at least 2")
    return int(min(max(round(n * fraction), 1), n - 1))


def split_features(feats: Features, params: SplitParams) -> tuple[Features, Features]:
    """Return (train, test); train.is_val marks the validation part of train."""
    rng = np.random.default_rng(params.seed)
    if params.by == "sequence":
        sequences, first = np.unique(feats.seq_id, return_index=True)
        unit_of_sample = np.searchsorted(sequences, feats.seq_id)
        if getattr(feats, "content", None) is not None:  # a copy of an earlier sequence joins its unit
            contents, unit_of_sequence = np.unique(feats.content[first], return_inverse=True)
            # units numbered in the order their first sequence comes (no copies: the sequences' own order)
            first_seen = np.full(len(contents), len(sequences))
            np.minimum.at(first_seen, unit_of_sequence, np.arange(len(sequences)))
            renumber = np.argsort(np.argsort(first_seen, kind="stable"), kind="stable")
            unit_of_sample = renumber[unit_of_sequence][unit_of_sample]
            units = np.arange(len(contents))
        else:
            units = np.arange(len(sequences))
        copies = len(sequences) - len(units)
        log.info("split by sequence: %d sequences, %d of them copies of another (same content): each kept on its "
                 "original's side", len(sequences), copies)
        if len(units) < 3:
            raise InputError(f"split.by=sequence needs at least 3 distinct sequences (test, validation, train); "
                             f"the features hold {len(units)}")
    else:
        units = np.arange(len(feats))
        unit_of_sample = units
    order = rng.permutation(len(units))
    n_test = _held_out(len(units), params.test_fraction)
    test_units = order[:n_test]
    rest = order[n_test:]
    val_units = rest[: _held_out(len(rest), params.val_fraction)]

    is_test = np.zeros(len(units), dtype=bool)
    is_test[test_units] = True
    is_val = np.zeros(len(units), dtype=bool)
    is_val[val_units] = True
    sample_test = is_test[unit_of_sample]
    train = feats.take(~sample_test)
    train.is_val = is_val[unit_of_sample][~sample_test]
    test = feats.take(sample_test)
    test.is_val = None
    log.info("split by %s: %d train samples (%d validation), %d test samples; %d/%d/%d units",
             params.by, len(train), int(train.is_val.sum()), len(test), len(units) - n_test - len(val_units),
             len(val_units), n_test)
    return train, test
