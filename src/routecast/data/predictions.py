"""Every predictor's ranked experts per test sample (`data/predictions.parquet`).

`evaluate` writes it and `simulate_prefetch` reads it: one row per test sample, in the test
split's order, with `seq_id` (int32), `token_pos` (int32), `layer` (int16: the source layer l;
the prediction is for layer l + lookahead) and, per predictor, `pred.<name>`
(fixed_size_list<int16>[R]): its R best experts for layer l + lookahead, best first, as an
engine would prefetch them. R = min(num_experts, MAX_RANKS). Schema metadata: `num_layers`,
`num_experts`, `top_k`, `lookahead` and `predictors` (a JSON list of the names, in order).

With several targets (`features.horizons`, `features.next_token`) a predictor that answers a
later target also has `pred.<name>@<target>` (the same type; target `h<d>` for layer l + d,
`next_token`): its ranking made at layer l for that target, a row of -1 where the sample has no
such target (l + d past the last layer, a sequence's last token). Metadata `targets`: a JSON
object, predictor name -> the targets it has, in order (absent: none).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from routecast.data.parquet import open_parquet
from routecast.errors import InputError
from routecast.pipeline.artifacts import atomic_path
from routecast.sim.names import BOUNDS

if TYPE_CHECKING:
    from routecast.data.features import Features

log = logging.getLogger(__name__)

MAX_RANKS = 16  # experts kept per prediction: more than any engine prefetches for one layer
PREFIX = "pred."
# Names the simulation's metrics use for other things: a predictor may not take them.
RESERVED_NAMES = (*BOUNDS, "replay", "engine")
_META_KEYS = ("num_layers", "num_experts", "top_k", "lookahead")


class PredictionsError(InputError):
    """A predictions file (or the rankings to write) breaks the format, or does not match the trace
    it is replayed on; the message says where. A stage reports it in one line (an `InputError`)."""


def prediction_ranks(num_experts: int) -> int:
    """R: how many of its best experts each prediction keeps."""
    return min(num_experts, MAX_RANKS)


@dataclass(frozen=True)
class PredictionsMeta:
    num_layers: int
    num_experts: int
    top_k: int
    lookahead: int


@dataclass
class Predictions:
    """A predictions file in memory: sample keys, and each predictor's rankings [N, R] (int16)."""

    meta: PredictionsMeta
    seq_id: np.ndarray  # int32 [N]
    token_pos: np.ndarray  # int32 [N]
    layer: np.ndarray  # int16 [N], the source layer l
    rankings: dict[str, np.ndarray]  # name -> int16 [N, R], in the file's order
    # name -> target key (h<d>, next_token) -> int16 [N, R] (rows of -1: no such target)
    targets: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.seq_id)


TARGET_SEPARATOR = "@"  # pred.<name>@<target>


def target_column(name: str, target: str) -> str:
    return f"{PREFIX}{name}{TARGET_SEPARATOR}{target}"


def _check_rankings(name: str, ranks: np.ndarray, n: int, meta: PredictionsMeta, where: str,
                    blanks: bool = False) -> None:
    """`blanks`: a row of -1 (no prediction for that sample) is allowed (a later target's column)."""
    r = prediction_ranks(meta.num_experts)
    if ranks.ndim != 2 or ranks.shape != (n, r):
        raise PredictionsError(f"{where}: {name}: rankings must be [{n} samples, R={r}], got {list(ranks.shape)}")
    if blanks:
        ranks = ranks[(ranks != -1).any(axis=1)]
    bad = ((ranks < 0) | (ranks >= meta.num_experts)).any(axis=1)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise PredictionsError(f"{where}: {name}: row {row}: expert ids {ranks[row].tolist()} out of range "
                               f"[0, num_experts={meta.num_experts})")
    ordered = np.sort(ranks, axis=1)
    repeats = (ordered[:, 1:] == ordered[:, :-1]).any(axis=1)
    if repeats.any():
        row = int(np.flatnonzero(repeats)[0])
        raise PredictionsError(f"{where}: {name}: row {row}: experts {ranks[row].tolist()} repeat an id")


def _check_keys(seq_id: np.ndarray, token_pos: np.ndarray, layer: np.ndarray, meta: PredictionsMeta,
                where: str) -> None:
    bad = (layer < 0) | (layer + meta.lookahead >= meta.num_layers)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise PredictionsError(f"{where}: row {row}: layer {layer[row]} out of range: a source layer l needs "
                               f"0 <= l and l + lookahead ({meta.lookahead}) < num_layers ({meta.num_layers})")
    if len(seq_id):
        order = np.lexsort((layer, token_pos, seq_id))
        keys = np.stack([seq_id[order], token_pos[order], layer[order]], axis=1).astype(np.int64)
        dup = np.flatnonzero((keys[1:] == keys[:-1]).all(axis=1))
        if len(dup):
            row = int(order[dup[0] + 1])
            raise PredictionsError(f"{where}: row {row}: (seq_id {seq_id[row]}, token_pos {token_pos[row]}, "
                                   f"layer {layer[row]}) appears twice")


def _check_names(names: list[str], where: str) -> None:
    for name in names:
        if not name or name in RESERVED_NAMES:
            raise PredictionsError(f"{where}: predictor name {name!r} is empty or reserved "
                                   f"({', '.join(RESERVED_NAMES)})")
    if len(set(names)) != len(names):
        raise PredictionsError(f"{where}: predictor names repeat: {names}")


def _int_array(values: np.ndarray, dtype: type, what: str, where: str) -> np.ndarray:
    """Narrow to `dtype`, refusing any value that does not fit."""
    info = np.iinfo(dtype)
    values = np.asarray(values)
    if len(values) and (values.min() < info.min or values.max() > info.max):
        raise PredictionsError(f"{where}: {what} values must fit {np.dtype(dtype).name}, got [{values.min()}, "
                               f"{values.max()}]")
    return values.astype(dtype)


def write_predictions(path: str | Path, test: Features, rankings: dict[str, np.ndarray],
                      targets: dict[str, dict[str, np.ndarray]] | None = None) -> None:
    """Write each predictor's rankings ([N, R], best first) for the test samples `test`, validated,
    atomically; `targets`: name -> target key -> its rankings for a later target (rows of -1: none)."""
    path = Path(path)
    where = str(path)
    meta = PredictionsMeta(test.meta.num_layers, test.meta.num_experts, test.meta.top_k, test.meta.lookahead)
    if not rankings:
        raise PredictionsError(f"{where}: no predictor to write")
    _check_names(list(rankings), where)
    n = len(test)
    seq_id = _int_array(test.seq_id, np.int32, "seq_id", where)
    token_pos = _int_array(test.token_pos, np.int32, "token_pos", where)
    layer = _int_array(test.layer, np.int16, "layer", where)
    _check_keys(seq_id, token_pos, layer, meta, where)
    r = prediction_ranks(meta.num_experts)
    columns = {"seq_id": pa.array(seq_id), "token_pos": pa.array(token_pos), "layer": pa.array(layer)}
    for name, ranks in rankings.items():
        ranks = np.asarray(ranks)
        _check_rankings(name, ranks, n, meta, where)
        flat = pa.array(ranks.astype(np.int16).ravel())
        columns[PREFIX + name] = pa.FixedSizeListArray.from_arrays(flat, r)
    targets = {name: by_target for name, by_target in (targets or {}).items() if by_target}
    for name, by_target in targets.items():
        if name not in rankings:
            raise PredictionsError(f"{where}: {name}: later targets of a predictor with no main ranking")
        for target, ranks in by_target.items():
            ranks = np.asarray(ranks)
            _check_rankings(f"{name}@{target}", ranks, n, meta, where, blanks=True)
            flat = pa.array(ranks.astype(np.int16).ravel())
            columns[target_column(name, target)] = pa.FixedSizeListArray.from_arrays(flat, r)
    metadata = {k.encode(): str(getattr(meta, k)).encode() for k in _META_KEYS}
    metadata[b"predictors"] = json.dumps(list(rankings)).encode()
    if targets:
        metadata[b"targets"] = json.dumps({name: list(by_target) for name, by_target in targets.items()}).encode()
    table = pa.table(columns).replace_schema_metadata(metadata)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    log.info("wrote %s: %d samples x %d predictors, %d ranked experts each", path, n, len(rankings), r)


def read_predictions(path: str | Path) -> Predictions:
    """Read and validate a predictions file; every problem raises PredictionsError naming the file."""
    path = Path(path)
    where = str(path)
    with open_parquet(path, "evaluate", PredictionsError) as pf:
        table = pf.read()
    metadata = table.schema.metadata or {}
    missing = [k for k in (*_META_KEYS, "predictors") if k.encode() not in metadata]
    if missing:
        raise PredictionsError(f"{where}: Parquet metadata lacks {', '.join(missing)}; was it written by evaluate?")
    try:
        meta = PredictionsMeta(**{k: int(metadata[k.encode()]) for k in _META_KEYS})
        names = json.loads(metadata[b"predictors"])
    except ValueError as exc:
        raise PredictionsError(f"{where}: malformed metadata: {exc}") from None
    if not (isinstance(names, list) and names and all(isinstance(n, str) and n for n in names)):
        raise PredictionsError(f"{where}: metadata `predictors` must be a non-empty JSON list of names, got {names!r}")
    _check_names(names, where)
    if meta.num_layers < 2 or meta.num_experts < 1 or not 1 <= meta.top_k <= meta.num_experts or meta.lookahead < 1:
        raise PredictionsError(f"{where}: bad shape in metadata: {meta}")
    try:
        targets_of = json.loads(metadata.get(b"targets", b"{}"))
    except ValueError as exc:
        raise PredictionsError(f"{where}: malformed metadata `targets`: {exc}") from None
    if not (isinstance(targets_of, dict) and set(targets_of) <= set(names)
            and all(isinstance(v, list) and all(isinstance(t, str) and t for t in v) for v in targets_of.values())):
        raise PredictionsError(f"{where}: metadata `targets` must map predictor names to lists of targets, "
                               f"got {targets_of!r}")
    columns = [c for c in table.column_names if c.startswith(PREFIX)]
    want = [PREFIX + n for n in names] + [target_column(n, t) for n in names for t in targets_of.get(n, [])]
    if columns != want:
        raise PredictionsError(f"{where}: prediction columns {columns} do not match metadata `predictors` {names} "
                               f"and `targets` {targets_of}")
    expected = {"seq_id": pa.int32(), "token_pos": pa.int32(), "layer": pa.int16()}
    r = prediction_ranks(meta.num_experts)
    expected |= {c: pa.list_(pa.int16(), r) for c in columns}
    for name, dtype in expected.items():
        if name not in table.column_names:
            raise PredictionsError(f"{where}: missing column {name!r}")
        if table.schema.field(name).type != dtype:
            raise PredictionsError(f"{where}: column {name!r} must be {dtype}, got {table.schema.field(name).type}")
    for name in table.column_names:
        if table.column(name).null_count:
            raise PredictionsError(f"{where}: column {name!r} has null values")
    seq_id = table.column("seq_id").to_numpy()
    token_pos = table.column("token_pos").to_numpy()
    layer = table.column("layer").to_numpy()
    _check_keys(seq_id, token_pos, layer, meta, where)
    rankings = {}
    for name in names:
        col = table.column(PREFIX + name).combine_chunks()
        ranks = col.flatten().to_numpy().reshape(-1, r) if len(col) else np.zeros((0, r), np.int16)
        _check_rankings(name, ranks, len(seq_id), meta, where)
        rankings[name] = ranks
    targets: dict[str, dict[str, np.ndarray]] = {}
    for name, keys in targets_of.items():
        for target in keys:
            col = table.column(target_column(name, target)).combine_chunks()
            ranks = col.flatten().to_numpy().reshape(-1, r) if len(col) else np.zeros((0, r), np.int16)
            _check_rankings(f"{name}@{target}", ranks, len(seq_id), meta, where, blanks=True)
            targets.setdefault(name, {})[target] = ranks
    return Predictions(meta, seq_id, token_pos, layer, rankings, targets)
