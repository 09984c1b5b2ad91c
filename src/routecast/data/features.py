"""Encode a canonical trace into samples: the seed's features and the next layer's target.

One sample per (token, layer l) with `l + lookahead < num_layers`, both layer l and layer
l + lookahead routed for that token; `lookahead` is the first (main) of `features.horizons`.
Features are what is known once layer l has routed:

    layer        l
    primary      the 1st expert at layer l (also history entry l when l < history_len; kept
                 on its own so a history shorter than the layers never loses it)
    secondary    the 2nd expert at layer l (-1 when top_k = 1)
    gating       the k gate weights at layer l
    history      primary expert at layers 0..l, stored +1 (0 = padding or a missing row),
                 right-padded to history_len; entry j is always layer j
    position     min(token_pos / position_scale, 1)
    spec_logits  (optional) the next layer's router logits on layer l's hidden state
    current_set  the k experts at layer l (for a weighted trace: by weight, highest first; for
                 an unweighted one: the set in ascending id order)
    token        (optional, `features.token`) the token: its vocabulary id where the trace has
                 one, else a stable 63-bit hash of its text (the same string gives the same key
                 in every trace, so a model's vocabulary carries over to other logs)
    content      the sequence's content hash (its tokens where the trace has them, else its
                 routing): copies of one prompt share it, so the split keeps them on one side
    prev_experts (optional, `features.prev_token`) the previous token's top-k at layer
                 l + lookahead, stored +1 (0 = no previous token or no row). In decode the
                 previous token has finished every layer before this one starts, so this is
                 known; valid for decode-order traces only (a prefill trace's tokens run together).

Target: the primary expert at layer l + lookahead; target_set: the whole top-k there. With more
than one target, horizon_set [N, H, k] holds the top-k at layer l + d for each horizon d (-1 where
l + d is past the last layer or that row is missing) and, with `features.next_token`, last, the
top-k of the next token of the sequence (position + 1) at layer l (-1 for a sequence's last token or
a missing row): its key in `meta.horizons` is NEXT_TOKEN (0). In a decode-order trace that is what
the engine routes next. `Features.at_horizon(d)` is the samples with a target at horizon d, that
target in `target` and `target_set`.

For an unweighted trace (`meta.weighted` False) `primary`, `secondary` and `target` are the lowest
ids of their sets and `gating` is uniform: kept so every kind runs, never scored as a primary.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from routecast.config.params import NEXT_TOKEN, FeaturesParams, target_name
from routecast.data.parquet import KeyedRows, ParquetMeta, open_parquet, take_rows
from routecast.data.traces import TraceError, Traces, read_trace_sequences
from routecast.errors import InputError
from routecast.pipeline.artifacts import atomic_path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeatureMeta(ParquetMeta):
    num_layers: int
    num_experts: int
    top_k: int
    history_len: int
    lookahead: int
    position_scale: float
    source: str = "unknown"
    weighted: bool = True  # False: the trace's sets are unordered, no primary exists (score sets only)
    # every horizon d predicted (the first is `lookahead`; NEXT_TOKEN, last: the next token); () reads as (lookahead,)
    horizons: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "horizons", tuple(self.horizons) or (self.lookahead,))
        if self.horizons[0] != self.lookahead:
            raise ValueError(f"horizons {self.horizons} must start with the lookahead {self.lookahead}")


@dataclass
class Features(KeyedRows):
    """Samples column by column (numpy), in (sequence, token, layer) order (`meta`: a FeatureMeta;
    seq_id, token_pos, layer: the sample's token and source layer)."""

    primary: np.ndarray  # int16 [N]
    secondary: np.ndarray  # int16 [N]
    gating: np.ndarray  # float32 [N, k]
    history: np.ndarray  # int16 [N, history_len]
    position: np.ndarray  # float32 [N]
    target: np.ndarray  # int16 [N]
    target_set: np.ndarray  # int16 [N, k]
    spec_logits: np.ndarray | None = None  # float32 [N, E]
    prev_experts: np.ndarray | None = None  # int16 [N, k], +1 (0 = none)
    current_set: np.ndarray | None = None  # int16 [N, k]: the experts at layer l
    token: np.ndarray | None = None  # int64 [N]: the token's id, or its text's hash (features.token)
    content: np.ndarray | None = None  # int64 [N]: the sequence's content hash
    is_val: np.ndarray | None = None  # bool [N], set by split_95_5 in the train split
    horizon_set: np.ndarray | None = None  # int16 [N, H, k]: the top-k at l + horizons[j] (-1: none); H > 1 only
    report: dict[str, int] = field(default_factory=dict)

    def take(self, index: np.ndarray) -> Features:
        """Rows `index` (an integer array or boolean mask)."""
        return take_rows(self, index, report={})

    def at_horizon(self, d: int) -> Features:
        """The samples with a target at layer l + d (a horizon of `meta.horizons`), that target in
        `target` and `target_set` and `meta.lookahead` = d: every single-horizon scorer reads it
        as it reads the main horizon. d = NEXT_TOKEN: the next token's experts at layer l
        (`meta.lookahead` 0: the target layer is the sample's own)."""
        horizons = self.meta.horizons
        if d not in horizons:
            raise ValueError(f"horizon {target_name(d)} is not one of the features' targets "
                             f"{[target_name(h) for h in horizons]}")
        if d == horizons[0]:
            if self.horizon_set is None:
                return self
            return dataclasses.replace(self, horizon_set=None, meta=dataclasses.replace(self.meta, horizons=(d,)))
        j = horizons.index(d)
        assert self.horizon_set is not None  # several horizons: written by encode_features
        rows = np.flatnonzero(self.horizon_set[:, j, 0] >= 0)
        view = take_rows(self, rows, report={}, horizon_set=None)
        target_set = self.horizon_set[rows, j]
        return dataclasses.replace(view, meta=dataclasses.replace(self.meta, lookahead=d, horizons=(d,)),
                                   target=target_set[:, 0].copy(), target_set=target_set)


# --------------------------------------------------------------------------- encoding


def text_keys(text: np.ndarray) -> np.ndarray:
    """A stable non-negative 63-bit key per string (blake2b of its UTF-8 bytes): the same string
    has the same key in every trace and every run. Each distinct string is hashed once."""
    cache: dict[str, int] = {}

    def key(word: str) -> int:
        found = cache.get(word)
        if found is None:
            digest = hashlib.blake2b(str(word).encode("utf-8"), digest_size=8).digest()
            found = cache[word] = int.from_bytes(digest, "little") >> 1
        return found

    return np.fromiter((key(w) for w in text), dtype=np.int64, count=len(text))


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise on uint64 (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def content_hashes(tokens: np.ndarray, value: np.ndarray) -> np.ndarray:
    """One int64 per token: the hash of its sequence's content, where `tokens` are the sorted
    token keys (`token_keys`) and `value` [n_tokens] (uint64) what each token holds. The hash
    mixes each value with its position and sums over the sequence, so two sequences collide
    only if they hold the same values at the same positions (or with probability ~2^-64)."""
    if len(tokens) == 0:
        return np.zeros(0, dtype=np.int64)
    seq, pos = tokens >> 32, tokens & 0xFFFFFFFF
    mixed = _mix64(value.astype(np.uint64) ^ _mix64(pos.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)))
    starts = np.flatnonzero(np.r_[True, seq[1:] != seq[:-1]])
    per_seq = np.add.reduceat(mixed, starts)
    lengths = np.diff(np.r_[starts, len(seq)])
    return (_mix64(per_seq ^ lengths.astype(np.uint64)) >> np.uint64(1)).astype(np.int64).repeat(lengths)


def row_token_keys(traces: Traces) -> np.ndarray | None:
    """Each row's token key: its token_id, else its text's `text_keys`; None when the trace has neither."""
    if traces.token_id is not None:
        return traces.token_id.astype(np.int64)
    if traces.token_text is not None:
        return text_keys(traces.token_text)
    return None


def token_keys(seq_id: np.ndarray, token_pos: np.ndarray) -> np.ndarray:
    """One int64 per token, ordered as (seq_id, token_pos): `seq_id << 32 | token_pos`. Both are
    non-negative int32 in a valid trace, so the key is unique and `split_token_keys` inverts it."""
    return (np.asarray(seq_id, dtype=np.int64) << 32) | np.asarray(token_pos, dtype=np.int64)


def split_token_keys(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(seq_id, token_pos) as int32 from `token_keys`."""
    return (keys >> 32).astype(np.int32), (keys & 0xFFFFFFFF).astype(np.int32)



def _rank_keys(seq_id: np.ndarray, token_pos: np.ndarray, key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """np.unique(key, return_inverse=True) for unordered rows. When the (seq_id, token_pos) box is
    small (a few times the row count, as in every real trace) a presence table and a cumulative
    sum rank the keys in O(rows) instead of sorting them."""
    if len(key) == 0:
        return np.unique(key, return_inverse=True)
    s_min, p_min = int(seq_id.min()), int(token_pos.min())
    span = int(token_pos.max()) - p_min + 1
    box = (int(seq_id.max()) - s_min + 1) * span
    if box > 4 * len(key) + 1024:
        return np.unique(key, return_inverse=True)
    dense = (seq_id - np.int64(s_min)) * span + (token_pos - np.int64(p_min))
    seen = np.zeros(box, dtype=bool)
    seen[dense] = True
    rank = np.cumsum(seen, dtype=np.int64) - 1
    occupied = np.flatnonzero(seen)
    tokens = token_keys(occupied // span + s_min, occupied % span + p_min)
    return tokens, rank[dense]


def encode_features(traces: Traces, params: FeaturesParams) -> Features:
    """Vectorised encoder (numpy only, no per-row Python loop).

    Builds dense [token, layer] grids, then takes every sample as a slice of them. A trace
    already in (seq_id, token_pos, layer) order (every source writes one) skips the sort, and a
    complete one (every token routed at every layer) skips the scatter into the grids too.
    """
    start = time.perf_counter()
    meta = traces.meta
    L, k, E, la = meta.num_layers, meta.top_k, meta.num_experts, params.lookahead
    H = params.history_len or L
    if max(params.horizons) >= L:
        raise InputError(f"features.horizons={list(params.horizons)}: horizon {max(params.horizons)} is past the "
                         f"last layer (no layer l + {max(params.horizons)}): the trace has {L} layers")
    n_rows = len(traces)
    layer = np.asarray(traces.layer)

    # A token is a (seq_id, token_pos) pair; number them in sorted key order.
    key = token_keys(traces.seq_id, traces.token_pos)
    new_token = np.empty(n_rows, dtype=bool)
    new_token[:1] = True
    np.not_equal(key[1:], key[:-1], out=new_token[1:])
    # Sorted by (token, layer) with no repeated layer: no sort, no duplicate check needed.
    in_order = n_rows > 0 and bool((key[1:] >= key[:-1]).all()) and bool(
        (new_token[1:] | (layer[1:] > layer[:-1])).all())
    if in_order:
        tokens = key[new_token]
        n_tokens = len(tokens)
        complete = n_rows == n_tokens * L and bool((layer.reshape(n_tokens, L) == np.arange(L)).all())
    else:
        tokens, token_idx = _rank_keys(traces.seq_id, traces.token_pos, key)
        n_tokens, complete = len(tokens), False
        cell = token_idx.astype(np.int64) * L + layer
        counts = np.bincount(cell, minlength=n_tokens * L)
        if (counts > 1).any():
            bad = int(np.flatnonzero(counts > 1)[0])
            t, bad_layer = divmod(bad, L)
            seq, pos = split_token_keys(tokens[t:t + 1])
            raise TraceError(f"duplicate rows for seq_id={seq[0]}, token_pos={pos[0]}, "
                             f"layer={bad_layer}")
    if not complete and in_order:
        cell = (np.cumsum(new_token, dtype=np.int64) - 1) * L + layer

    def grid(values: np.ndarray, fill: float, dtype: type) -> np.ndarray:
        """values [rows, w] as a dense [n_tokens, L, w] grid (`fill` where a row is missing)."""
        width = values.shape[1]
        if complete:
            return np.asarray(values, dtype=dtype).reshape(n_tokens, L, width)
        out = np.full((n_tokens * L, width), fill, dtype=dtype)
        out[cell] = values
        return out.reshape(n_tokens, L, width)

    if complete:
        present = np.ones((n_tokens, L), dtype=bool)
    else:
        present = np.zeros(n_tokens * L, dtype=bool)
        present[cell] = True
        present = present.reshape(n_tokens, L)
    experts = grid(traces.experts, -1, np.int16)
    gates = grid(traces.weights, 0.0, np.float32)
    row_keys = row_token_keys(traces)
    if params.token and row_keys is None:
        raise InputError("features.token: the trace has neither token ids nor token text (its source records "
                         "neither); set features.token: false")
    token_key = None if row_keys is None else grid(row_keys[:, None], -1, np.int64)[:, :, 0].max(axis=1)
    if token_key is not None:  # the sequence's tokens say what it is
        content_value = token_key.astype(np.uint64)
    else:  # else its routing: every layer's experts, each (layer, slot) weighted by its own odd multiplier
        weights = np.random.default_rng(0x5EED).integers(1, 2**62, size=L * k, dtype=np.uint64) | np.uint64(1)
        content_value = (experts.reshape(n_tokens, L * k).astype(np.int64) + 1).astype(np.uint64) @ weights
    content = content_hashes(tokens, content_value)

    # Sample grid: (token, layer l) for l < L - la, kept where layer l and l + la are both routed.
    n_src = L - la
    have_layer = present[:, :n_src]
    have_target = present[:, la:]
    keep = (have_layer & have_target).ravel()
    keep_all = bool(keep.all())

    def samples(block: np.ndarray, fresh: bool = False) -> np.ndarray:
        """A [n_tokens, n_src, ...] block as [samples, ...] (row-major: token, then layer), in its own
        memory (never a view of the trace's arrays); `fresh`: block is already a private array."""
        flat = block.reshape(n_tokens * n_src, *block.shape[2:])
        if not keep_all:
            return flat[keep]
        return flat if fresh or not np.may_share_memory(flat, block) else flat.copy()

    # History: entry j = primary at layer j (+1), only for j <= l. One broadcast write of
    # [n_tokens, n_src, H] (no [samples, H] gather followed by a masked copy).
    hist_token = np.zeros((n_tokens, H), dtype=np.int16)
    hw = min(H, L)
    np.add(experts[:, :hw, 0], 1, out=hist_token[:, :hw], where=present[:, :hw])
    visible = np.arange(H)[None, :] <= np.arange(n_src)[:, None]  # [n_src, H]
    history = samples(hist_token[:, None, :] * visible[None].astype(np.int16), fresh=True)

    token_of_sample = np.repeat(tokens, n_src) if keep_all else np.repeat(tokens, n_src)[keep]
    seq_id, token_pos = split_token_keys(token_of_sample)
    layers = np.broadcast_to(np.arange(n_src, dtype=np.int16), (n_tokens, n_src))
    spec = None
    if traces.spec_logits is not None:
        spec = samples(grid(traces.spec_logits, 0.0, np.float32)[:, :n_src])
    prev = None
    if params.prev_token:
        # The previous token of the same sequence is the previous row of `tokens` with position - 1.
        has_prev = np.zeros(n_tokens, dtype=bool)
        has_prev[1:] = tokens[1:] - 1 == tokens[:-1]
        prev_grid = np.zeros((n_tokens, n_src, k), dtype=np.int16)
        routed = has_prev[1:, None] & present[:-1, la:]  # [n_tokens - 1, n_src]
        np.add(experts[:-1, la:], 1, out=prev_grid[1:], where=routed[:, :, None])
        prev = samples(prev_grid, fresh=True)
    ahead = None
    if len(params.targets) > 1:  # the top-k at l + d for every horizon d (-1 past the last layer or missing)
        ahead_grid = np.full((n_tokens, n_src, len(params.targets), k), -1, dtype=np.int16)
        for j, d in enumerate(params.targets):
            if d == NEXT_TOKEN:  # the next token of the sequence (position + 1) at layer l, where routed
                has_next = tokens[1:] - 1 == tokens[:-1]  # [n_tokens - 1]
                routed = has_next[:, None] & present[1:, :n_src]
                np.copyto(ahead_grid[:-1, :, j], experts[1:, :n_src], where=routed[:, :, None])
            elif d < L:
                routed = present[:, d:d + n_src]  # [n_tokens, min(n_src, L - d)]
                np.copyto(ahead_grid[:, :L - d, j], experts[:, d:d + n_src], where=routed[:, :, None])
        ahead = samples(ahead_grid, fresh=True)

    feats = Features(
        meta=FeatureMeta(L, E, k, H, la, float(params.position_scale), meta.source, meta.weighted,
                         params.targets),
        seq_id=seq_id,
        token_pos=token_pos,
        layer=samples(layers),
        primary=samples(experts[:, :n_src, 0]),
        secondary=samples(experts[:, :n_src, 1]) if k > 1 else np.full(len(seq_id), -1, dtype=np.int16),
        gating=samples(gates[:, :n_src]),
        history=history,
        position=np.minimum(token_pos / params.position_scale, 1.0).astype(np.float32),
        target=samples(experts[:, la:, 0]),
        target_set=samples(experts[:, la:]),
        spec_logits=spec,
        prev_experts=prev,
        current_set=samples(experts[:, :n_src]),
        token=samples(np.broadcast_to(token_key[:, None], (n_tokens, n_src))) if params.token else None,
        content=samples(np.broadcast_to(content[:, None], (n_tokens, n_src))),
        horizon_set=ahead,
    )
    candidates = n_tokens * n_src
    feats.report = {
        "trace_rows": n_rows,
        "tokens": n_tokens,
        "candidate_samples": candidates,
        "samples": len(feats),
        "dropped_missing_layer": int((~have_layer).sum()),
        "dropped_missing_target": int((have_layer & ~have_target).sum()),
        "history_entries_missing": int((~present[:, : L - 1]).sum()),
    }
    log.info("encoded %d samples from %d trace rows (%d tokens) in %.2fs; dropped %d (layer row missing) "
             "and %d (target row missing)", len(feats), n_rows, n_tokens, time.perf_counter() - start,
             feats.report["dropped_missing_layer"], feats.report["dropped_missing_target"])
    return feats


# --------------------------------------------------------------------------- Parquet I/O

_MATRIX_COLUMNS = ("gating", "history", "target_set", "spec_logits", "prev_experts", "current_set", "horizon_set")


def features_to_table(feats: Features) -> pa.Table:
    columns: dict[str, pa.Array] = {}
    for f in fields(feats):
        value = getattr(feats, f.name)
        if not isinstance(value, np.ndarray):
            continue
        if f.name in _MATRIX_COLUMNS:  # horizon_set's [N, H, k] is stored as [N, H * k]
            width = int(np.prod(value.shape[1:]))
            columns[f.name] = pa.FixedSizeListArray.from_arrays(pa.array(value.ravel()), width)
        else:
            columns[f.name] = pa.array(value)
    table = pa.table(columns)
    return table.replace_schema_metadata(feats.meta.to_metadata())


def write_features(path: str | Path, feats: Features) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(features_to_table(feats), tmp, compression="zstd")


# pq.write_table's default row-group length: encode_features_file writes row groups of exactly this
# many rows, so its file equals write_features(encode_features(...)) byte for byte.
FEATURE_ROW_GROUP = 1024 * 1024
ENCODE_GROUP_ROWS = 2_000_000  # trace rows encoded at a time by encode_features_file


def encode_features_file(trace_path: str | Path, params: FeaturesParams, out_path: str | Path,
                         max_rows: int = ENCODE_GROUP_ROWS) -> dict[str, int]:
    """`write_features(out_path, encode_features(read_traces(trace_path), params))` for a trace of
    any size, in bounded memory; returns the same report. The same file, byte for byte.

    Samples are independent across sequences and ordered by (sequence, token, layer), so the
    trace is encoded in groups of whole sequences of about `max_rows` rows, in increasing seq_id
    order (`read_trace_sequences`: a trace not sorted by seq_id is read once per group, logged),
    and the samples are written as they come in row groups of FEATURE_ROW_GROUP rows.
    """
    from tqdm import tqdm

    report: dict[str, int] = {}
    pending: list[pa.Table] = []
    with atomic_path(out_path) as tmp:
        writer: pq.ParquetWriter | None = None
        try:
            for traces in tqdm(read_trace_sequences(trace_path, max_rows), desc="encode_features", unit="group"):
                feats = encode_features(traces, params)
                for key, value in feats.report.items():
                    report[key] = report.get(key, 0) + value
                table = features_to_table(feats)
                if writer is None:
                    writer = pq.ParquetWriter(tmp, table.schema, compression="zstd")
                pending.append(table)
                pending = _write_row_groups(writer, pending, final=False)
            assert writer is not None  # read_trace_sequences yields at least one group
            _write_row_groups(writer, pending, final=True)
        finally:
            if writer is not None:
                writer.close()
    log.info("encode_features_file: %s -> %s: %d samples from %d trace rows", trace_path, out_path,
             report.get("samples", 0), report.get("trace_rows", 0))
    return report


def _write_row_groups(writer: pq.ParquetWriter, pending: list[pa.Table], final: bool) -> list[pa.Table]:
    """Write full row groups of FEATURE_ROW_GROUP rows from `pending` (all of it if `final`, as
    pq.write_table would, an empty table included); return what is left."""
    rows = sum(t.num_rows for t in pending)
    if rows < FEATURE_ROW_GROUP and not final:
        return pending
    table = pa.concat_tables(pending).combine_chunks()
    full = rows if final else rows - rows % FEATURE_ROW_GROUP
    if full or (final and rows == 0):
        writer.write_table(table.slice(0, full), row_group_size=FEATURE_ROW_GROUP)
    return [table.slice(full)] if full < rows else []


_READ_BATCH = 1 << 17  # rows decoded at once by read_features


def _column_array(col: pa.Array, matrix: bool) -> np.ndarray:
    """One column as an array NumPy owns ([N, width] for a list column)."""
    if not matrix:
        return np.array(col.to_numpy(zero_copy_only=False))
    width = col.type.list_size if pa.types.is_fixed_size_list(col.type) else None
    flat = np.array(pc.list_flatten(col).to_numpy(zero_copy_only=False))
    return flat.reshape(len(col), width or (len(flat) // max(len(col), 1)))


def read_features(path: str | Path) -> Features:
    """The samples in `path`, each column an array of its own.

    Column by column and in batches of rows, each copied out of Arrow and Arrow's memory
    handed back at once: the peak is the samples plus a batch, not the samples several times over
    (decoding a list column of a whole file takes about seven times its size); on the DeepSeek-V2-Lite
    log's training split that is 0.6 GiB less in every stage that reads it."""
    path = Path(path)
    kwargs: dict[str, Any] = {}
    with open_parquet(path, "encode_features") as pf:
        meta = FeatureMeta.from_metadata(pf.schema_arrow.metadata, str(path))
        names = set(pf.schema_arrow.names)
        for f in fields(Features):
            if f.name in ("meta", "report") or f.name not in names:
                continue
            parts = [_column_array(batch.column(0), f.name in _MATRIX_COLUMNS)
                     for batch in pf.iter_batches(batch_size=_READ_BATCH, columns=[f.name])]
            if not parts:  # no rows: the column's empty array, of its type and width
                parts = [_column_array(pf.read(columns=[f.name]).column(0).combine_chunks(), f.name in _MATRIX_COLUMNS)]
            kwargs[f.name] = parts[0] if len(parts) == 1 else np.concatenate(parts)
            del parts
            pa.default_memory_pool().release_unused()
    missing = [f.name for f in fields(Features) if f.default is not None and f.name not in kwargs
               and f.name not in ("meta", "report")]
    if missing:
        raise InputError(f"{path}: missing feature column(s) {missing}; was it written by encode_features?")
    if "horizon_set" in kwargs:
        kwargs["horizon_set"] = kwargs["horizon_set"].reshape(len(kwargs["horizon_set"]), len(meta.horizons), -1)
    return Features(meta=meta, **kwargs)
