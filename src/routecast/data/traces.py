"""The canonical routing trace (`data/traces.parquet`): schema, validation, streamed writing.

One row per (sequence, token, layer): `seq_id`, `token_pos`, `layer`, `experts` (k ids, highest
weight first), `weights` (their gate weights, summing to 1), optional `token_id`, `token_text`
(the tokenizer's string, where a log has it) and `spec_logits` (the next layer's router logits on
this layer's hidden state). File metadata holds `num_layers`, `num_experts`, `top_k`, `weighted`,
`source` and `source_params`.

A log without gate weights (the DeepSeek-V2-Lite log) gives an unweighted trace (`weighted:
False`): each row's experts are a set, stored in ascending id order (their order means nothing),
and `weights` is null on disk. In memory such a trace's `weights` are uniform (1/k), so every
consumer reads the same arrays; nothing may treat the first expert of a set as a primary.

Every source writes through `TraceWriter`, which checks each batch before it is written (every
value fits its on-disk type, int32 or int16, before it is narrowed), runs the whole-trace
checks at the end (layers contiguous, no repeated (sequence, token, layer) row) in bounded
memory, and renames the file into place only when the whole trace is valid. The readers check
every value fits before they narrow it too.
"""

from __future__ import annotations

import base64
import bisect
import contextlib
import logging
import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from routecast.data.parquet import KeyedRows, ParquetMeta, open_parquet
from routecast.errors import InputError
from routecast.pipeline.artifacts import atomic_path

log = logging.getLogger(__name__)

WEIGHT_SUM_ATOL = 1e-3  # float16/bfloat16 routers renormalise to within this of 1

# The on-disk type of every integer column. Layer and expert ids are int16, so a trace has at
# most SHAPE_LIMIT layers and experts.
COLUMN_TYPES: dict[str, type] = {"seq_id": np.int32, "token_pos": np.int32, "layer": np.int16,
                                 "experts": np.int16, "token_id": np.int32}
SHAPE_LIMIT = int(np.iinfo(np.int16).max) + 1
_FLOAT32_MAX = float(np.finfo(np.float32).max)


class TraceError(InputError):
    """A trace (or the file it came from) breaks the canonical schema; the message names where."""


@dataclass(frozen=True)
class TraceMeta(ParquetMeta):
    error: ClassVar[type[Exception]] = TraceError  # bad metadata in a file

    num_layers: int
    num_experts: int
    top_k: int
    source: str = "unknown"  # the generator, model or importer that produced the trace
    source_params: dict[str, Any] = field(default_factory=dict)
    weighted: bool = True  # False: each row's experts are a set (ascending ids), no weights, no primary

    def __post_init__(self) -> None:
        if not (1 <= self.num_layers <= SHAPE_LIMIT and 1 <= self.num_experts <= SHAPE_LIMIT
                and 1 <= self.top_k <= self.num_experts):
            raise TraceError(
                f"bad trace shape: num_layers={self.num_layers}, num_experts={self.num_experts}, top_k={self.top_k} "
                f"(1 <= top_k <= num_experts; at most {SHAPE_LIMIT} layers and experts)"
            )


@dataclass
class Traces(KeyedRows):
    """A whole trace in memory, column by column (`meta`: a TraceMeta; seq_id, token_pos, layer)."""

    experts: np.ndarray  # int16 [N, k]
    weights: np.ndarray  # float32 [N, k] (uniform 1/k for an unweighted trace)
    token_id: np.ndarray | None = None  # int32 [N]
    spec_logits: np.ndarray | None = None  # float32 [N, E]
    token_text: np.ndarray | None = None  # object [N]: the tokenizer's string of the row's token


def trace_schema(meta: TraceMeta, with_token_id: bool, with_spec_logits: bool,
                 with_token_text: bool = False) -> pa.Schema:
    fields = [
        pa.field("seq_id", pa.int32(), nullable=False),
        pa.field("token_pos", pa.int32(), nullable=False),
        pa.field("layer", pa.int16(), nullable=False),
        pa.field("experts", pa.list_(pa.int16(), meta.top_k), nullable=False),
        pa.field("weights", pa.list_(pa.float32(), meta.top_k), nullable=not meta.weighted),
    ]
    if with_token_id:
        fields.append(pa.field("token_id", pa.int32()))
    if with_spec_logits:
        fields.append(pa.field("spec_logits", pa.list_(pa.float32(), meta.num_experts)))
    if with_token_text:
        fields.append(pa.field("token_text", pa.string()))
    return pa.schema(fields, metadata=meta.to_metadata())


def uniform_weights(rows: int, top_k: int) -> np.ndarray:
    """The in-memory weights of an unweighted trace's rows: 1/k each."""
    return np.full((rows, top_k), 1.0 / top_k, dtype=np.float32)


# --------------------------------------------------------------------------- naming rows and checking values


@dataclass(frozen=True)
class RowNames:
    """Names the rows of one batch in error messages, lazily (no string per row is built):
    row i is `f"{label} {first + i}"`, or `f"{label} {numbers[i]}"` when `numbers` is given."""

    label: str = "row"
    first: int = 0
    numbers: np.ndarray | None = None

    def __getitem__(self, i: int) -> str:
        return f"{self.label} {self.first + i if self.numbers is None else int(self.numbers[i])}"

    def take(self, rows: np.ndarray) -> RowNames:
        """The names of `rows` (indices or a mask) of this batch."""
        numbers = np.arange(self.first, self.first + len(rows)) if self.numbers is None else self.numbers
        return RowNames(self.label, numbers=np.asarray(numbers)[rows])


def _where(where: str, origin: Any, row: int) -> str:
    return f"{where}: {origin[row]}" if origin is not None else f"{where}: row {row}"


def int_error(column: str, value: int) -> str | None:
    """Why `value` cannot be stored in the integer column `column` (None if it can)."""
    top = int(np.iinfo(COLUMN_TYPES[column]).max)
    if value < 0:
        return f"{value} is negative"
    if value > top:
        return f"{value} does not fit {np.dtype(COLUMN_TYPES[column]).name} (at most {top})"
    return None


def _first(mask: np.ndarray) -> int | None:
    """The first row with a True in `mask` ([rows] or [rows, k]), or None. The whole mask is tested
    first: a row-wise any() over a short axis is slow, and only needed on the error path."""
    if not mask.any():
        return None
    return int(np.argmax(mask.reshape(len(mask), -1).any(axis=1)))


def to_column_type(values: Any, column: str, where: str = "trace", origin: Any = None) -> np.ndarray:
    """`values` (one value per row, or a row of k ids for `experts`) as the column's on-disk
    integer type, after checking every value is a whole number that fits it: nothing wraps or
    truncates. Raises TraceError naming the first bad row."""
    dtype = COLUMN_TYPES[column]
    arr = np.asarray(values)
    rows = arr.reshape(len(arr), -1) if arr.ndim else arr.reshape(1, 1)
    top = int(np.iinfo(dtype).max)
    kind = arr.dtype.kind
    if kind in "iu":
        bad = (rows < 0) | (rows > top)
    elif kind == "f":
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(rows) | (rows != np.floor(rows)) | (rows < 0) | (rows > top)
    elif kind == "O":
        bad = np.array([[not _fits(v, top) for v in row] for row in rows], dtype=bool).reshape(rows.shape)
    else:
        raise TraceError(f"{where}: {column} must hold integers, got {arr.dtype}")
    row = _first(bad)
    if row is None:
        return arr.astype(dtype)
    value = rows[row][bad[row]][0]
    value = value.item() if isinstance(value, np.generic) else value
    if _whole(value):
        reason = int_error(column, int(value))
    else:
        reason = f"{value!r} is not a whole number"
    name = f"experts {rows[row].tolist()}: id {reason}" if column == "experts" else f"{column} {reason}"
    raise TraceError(f"{_where(where, origin, row)}: {name}")


def _whole(value: Any) -> bool:
    if isinstance(value, (int, np.integer)):
        return not isinstance(value, bool)
    return isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer()


def _fits(value: Any, top: int) -> bool:
    return _whole(value) and 0 <= value <= top


def to_float32(values: Any, column: str, where: str = "trace", origin: Any = None) -> np.ndarray:
    """`values` as float32, refusing a finite value too large for float32 (it would become inf)."""
    arr = np.asarray(values)
    if arr.dtype.kind not in "fiu":
        raise TraceError(f"{where}: {column} must hold numbers, got {arr.dtype}")
    if arr.dtype.kind == "f" and arr.dtype.itemsize > 4:
        rows = arr.reshape(len(arr), -1)
        row = _first(np.isfinite(rows) & (np.abs(rows) > _FLOAT32_MAX))
        if row is not None:
            raise TraceError(f"{_where(where, origin, row)}: {column} {rows[row].tolist()} do not fit float32")
    return arr.astype(np.float32)


def validate_batch(
    meta: TraceMeta,
    seq_id: np.ndarray,
    token_pos: np.ndarray,
    layer: np.ndarray,
    experts: np.ndarray,
    weights: np.ndarray,
    token_id: np.ndarray | None = None,
    spec_logits: np.ndarray | None = None,
    where: str = "trace",
    origin: Any = None,
) -> None:
    """Raise `TraceError` naming the first bad row. `origin[i]` describes row i (e.g. 'line 17')."""
    n = len(seq_id)
    k, num_experts = meta.top_k, meta.num_experts
    for name, arr in (("token_pos", token_pos), ("layer", layer)):
        if len(arr) != n:
            raise TraceError(f"{where}: column {name} has {len(arr)} rows, seq_id has {n}")
    if experts.shape != (n, k) or weights.shape != (n, k):
        raise TraceError(
            f"{where}: experts/weights must be [{n}, top_k={k}], got {list(experts.shape)} and {list(weights.shape)}"
        )

    def fail(mask: np.ndarray, message: Any) -> None:
        row = _first(mask)
        if row is not None:
            raise TraceError(f"{_where(where, origin, row)}: {message(row) if callable(message) else message}")

    ints = [("seq_id", seq_id), ("token_pos", token_pos), ("layer", layer)]
    for name, arr in ints + ([("token_id", token_id)] if token_id is not None else []):
        top = int(np.iinfo(COLUMN_TYPES[name]).max)
        fail((arr < 0) | (arr > top), lambda r, name=name, arr=arr: f"{name} {int_error(name, int(arr[r]))}")
    fail(layer >= meta.num_layers, lambda r: f"layer {layer[r]} out of range [0, num_layers={meta.num_layers})")
    unfit = (experts < 0) | (experts >= SHAPE_LIMIT)
    fail(unfit, lambda r: f"experts {experts[r].tolist()}: id {int_error('experts', int(experts[r][unfit[r]][0]))}")
    fail(experts >= num_experts,
         lambda r: f"expert id in {experts[r].tolist()} out of range [0, num_experts={num_experts})")
    if not meta.weighted and k > 1:
        fail(np.diff(experts.astype(np.int32), axis=1) == 0, lambda r: f"experts {experts[r].tolist()} repeat an id")
        fail(np.diff(experts.astype(np.int32), axis=1) < 0,
             lambda r: f"experts {experts[r].tolist()}: an unweighted trace stores each set in ascending id order")
    elif k == 2:
        fail(experts[:, 0] == experts[:, 1], lambda r: f"experts {experts[r].tolist()} repeat an id")
    elif k > 2:
        ordered = np.sort(experts, axis=1)
        fail(ordered[:, 1:] == ordered[:, :-1], lambda r: f"experts {experts[r].tolist()} repeat an id")
    fail(~np.isfinite(weights), lambda r: f"weights {weights[r].tolist()} are not finite")
    fail(weights < 0, lambda r: f"weights {weights[r].tolist()} are negative")
    sums = weights.sum(axis=1, dtype=np.float64)
    fail(np.abs(sums - 1.0) > WEIGHT_SUM_ATOL, lambda r: f"weights {weights[r].tolist()} sum to {sums[r]:.6f}, not 1")
    if k > 1:
        fail(np.diff(weights, axis=1) > 1e-6,
             lambda r: f"experts must be sorted by weight, highest first; weights are {weights[r].tolist()}")
    if spec_logits is not None:
        if spec_logits.shape != (n, num_experts):
            raise TraceError(f"{where}: spec_logits must be [{n}, num_experts={num_experts}], "
                             f"got {list(spec_logits.shape)}")
        fail(~np.isfinite(spec_logits), "spec_logits are not finite")


# --------------------------------------------------------------------------- whole-trace checks


class _RowKeys:
    """Every written row's (seq_id, token_pos, layer), appended to a scratch file beside the trace,
    for the checks that need the whole trace: no repeated row, and the distinct tokens and
    sequences. The check reads the file back in passes, each over one hash partition of
    (seq_id, token_pos) of at most PASS_ROWS rows, and sorts that; so memory stays bounded
    whatever the trace's size or row order."""

    DTYPE = np.dtype([("seq", "<i4"), ("tok", "<i4"), ("layer", "<i2")])
    PASS_ROWS = 8_000_000
    READ_ROWS = 2_000_000  # rows per read of the scratch file

    def __init__(self, beside: Path) -> None:
        # named like atomic_path's temporaries (writer's pid), so a killed writer's file is removed too
        fd, name = tempfile.mkstemp(prefix=f".{beside.name}.{os.getpid()}.", suffix=".keys.tmp", dir=beside.parent)
        self.path = Path(name)
        self._fh = os.fdopen(fd, "w+b")
        self.rows = 0
        self._seq_ids = np.zeros(0, dtype=np.int32)

    def add(self, seq_id: np.ndarray, token_pos: np.ndarray, layer: np.ndarray) -> None:
        rec = np.empty(len(seq_id), dtype=self.DTYPE)
        rec["seq"], rec["tok"], rec["layer"] = seq_id, token_pos, layer
        self._fh.write(rec.data)
        runs = seq_id[np.r_[True, seq_id[1:] != seq_id[:-1]]]  # sequences come in runs: few values
        self._seq_ids = np.union1d(self._seq_ids, runs)
        self.rows += len(seq_id)

    def close(self) -> None:
        self._fh.close()
        self.path.unlink(missing_ok=True)

    def check(self) -> tuple[int, int, tuple[int, int, int, int, int] | None]:
        """(distinct sequences, distinct tokens, the first repeat) where the first repeat is
        (earlier row, later row, seq_id, token_pos, layer) with the smallest later row, or None."""
        self._fh.flush()
        passes = -(-self.rows // self.PASS_ROWS)
        tokens, repeat = 0, None
        for part in range(passes):
            seq, tok, layer = self._partition(part, passes)
            if len(seq) == 0:
                continue
            n_tokens, found = _check_keys(seq, tok, layer)
            tokens += n_tokens
            if found is not None:
                rows = self._partition(part, passes, rows=True)[0]
                earlier, later = (int(rows[i]) for i in found)
                if repeat is None or later < repeat[1]:
                    i = found[0]
                    repeat = (earlier, later, int(seq[i]), int(tok[i]), int(layer[i]))
        return len(self._seq_ids), tokens, repeat

    def _partition(self, part: int, passes: int, rows: bool = False) -> tuple[np.ndarray, ...]:
        """(seq_id, token_pos, layer) of the rows whose hash of (seq_id, token_pos) falls in `part` of
        `passes` (every layer of a token lands in one partition), or with `rows` their row numbers."""
        pieces = []
        for start in range(0, self.rows, self.READ_ROWS):
            self._fh.seek(start * self.DTYPE.itemsize)
            count = min(self.READ_ROWS, self.rows - start)
            rec = np.frombuffer(self._fh.read(count * self.DTYPE.itemsize), dtype=self.DTYPE)
            keep = slice(None)
            if passes > 1:
                mixed = (rec["seq"].astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
                         ^ rec["tok"].astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F))
                keep = (mixed >> np.uint64(40)) % np.uint64(passes) == part
            if rows:
                pieces.append((np.arange(start, start + count)[keep],))
            else:
                pieces.append((rec["seq"][keep], rec["tok"][keep], rec["layer"][keep]))
        return tuple(np.concatenate(column) for column in zip(*pieces))


def _check_keys(seq: np.ndarray, tok: np.ndarray, layer: np.ndarray) -> tuple[int, tuple[int, int] | None]:
    """The distinct (seq, tok) pairs among these rows, and the positions (earlier, later) of their
    first repeated (seq, tok, layer) row: of all repeats, the one whose second row comes first."""
    s0, t0 = int(seq.min()), int(tok.min())
    width = int(layer.max()) + 1
    span = int(tok.max()) - t0 + 1
    if (int(seq.max()) - s0 + 1) * span * width < 2**63:  # one collision-free int64 key: sort that

        def make_key() -> np.ndarray:  # in place, to hold one int64 per row
            key = seq.astype(np.int64)
            key -= s0
            key *= span
            key += tok
            key -= t0
            key *= width
            key += layer
            return key

        ordered = make_key()
        ordered.sort()
        repeated = bool((ordered[1:] == ordered[:-1]).any())
        ordered //= width  # the token of each row
        tokens = 1 + int(np.count_nonzero(ordered[1:] != ordered[:-1]))
        if not repeated:
            return tokens, None
        key = make_key()
        order = np.argsort(key, kind="stable")
        key = key[order]
        same = key[1:] == key[:-1]
    else:  # ranges too wide for one key: sort on the three columns
        order = np.lexsort((layer, tok, seq))
        s, t, l_sorted = seq[order], tok[order], layer[order]
        new_token = (s[1:] != s[:-1]) | (t[1:] != t[:-1])
        tokens = 1 + int(np.count_nonzero(new_token))
        same = ~new_token & (l_sorted[1:] == l_sorted[:-1])
        if not same.any():
            return tokens, None
    # Stable order: within a run of equal keys rows are in file order; the pair of interest in
    # each run is its first two rows, and the one reported has the earliest second row.
    starts = np.flatnonzero(same & ~np.r_[False, same[:-1]])
    i = int(np.argmin(order[starts + 1]))
    return tokens, (int(order[starts[i]]), int(order[starts[i] + 1]))


# --------------------------------------------------------------------------- writing


class TraceWriter:
    """Stream batches of rows into a canonical trace file, validated, written atomically.

    >>> with TraceWriter("data/traces.parquet", meta, where="log.jsonl") as w:
    ...     w.write(seq_id=..., token_pos=..., layer=..., experts=..., weights=..., origin=RowNames("line", 1))

    Each batch is checked before it is written (`validate_batch`, after checking each value fits
    its on-disk type). At the end the whole trace is checked: layers contiguous 0..L-1 and no
    (seq_id, token_pos, layer) row twice (see `_RowKeys`); the file appears only when the block
    exits without error and these hold; otherwise nothing is written. `finish()` runs those
    checks early and returns counts, e.g. to record them in `source_params` before exit.

    `infer` names shape fields the input decides: "num_layers" (largest layer + 1) and
    "num_experts" (largest expert id + 1); their values in `meta` are ignored. The Parquet
    metadata is written when the file is closed, so it holds the inferred shape.
    """

    def __init__(self, path: str | Path, meta: TraceMeta, with_token_id: bool = False,
                 with_spec_logits: bool = False, where: str | None = None, infer: Sequence[str] = (),
                 with_token_text: bool = False) -> None:
        unknown = set(infer) - {"num_layers", "num_experts"}
        if unknown or (with_spec_logits and "num_experts" in infer):
            raise ValueError(f"infer: {sorted(infer)} (spec_logits need a known num_experts)")
        self.path = Path(path)
        self.where = where or str(self.path)
        self.infer = tuple(infer)
        self.meta = meta
        self.source_params = dict(meta.source_params)  # may be updated before exit
        # the bounds each batch is checked against: inferred fields are bounded by the id types only
        self._bounds = replace(meta, **{name: SHAPE_LIMIT for name in self.infer})
        self.schema = trace_schema(meta, with_token_id, with_spec_logits, with_token_text)
        self.rows = 0
        self._layers_seen = np.zeros(self._bounds.num_layers, dtype=bool)
        self._max_expert = -1
        self._batches: list[tuple[int, str, Any]] = []  # (first row, where, origin) per batch, to name rows
        self._stats: dict[str, int] | None = None
        self._atomic = atomic_path(self.path)
        self._writer: pq.ParquetWriter | None = None
        self._keys: _RowKeys | None = None

    def __enter__(self) -> TraceWriter:
        tmp = self._atomic.__enter__()
        try:
            self._keys = _RowKeys(self.path)
            # no dictionary pages: they cost half the write time and make this data larger, not smaller
            self._writer = pq.ParquetWriter(tmp, self.schema, compression="zstd", use_dictionary=False)
        except BaseException as exc:
            if self._keys is not None:
                self._keys.close()
            self._atomic.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    def write(self, seq_id: Sequence[int] | np.ndarray, token_pos: Sequence[int] | np.ndarray,
              layer: Sequence[int] | np.ndarray, experts: np.ndarray, weights: np.ndarray | None,
              token_id: np.ndarray | None = None, spec_logits: np.ndarray | None = None,
              where: str | None = None, origin: Any = None, token_text: Sequence[str] | None = None) -> None:
        """Check and write one batch. `origin[i]` names row i in errors (an array of strings or a
        `RowNames`); by default rows are named by their row number in the written trace. An
        unweighted trace's batch has `weights` None (or uniform: what its reader gives back)."""
        assert self._writer is not None, "use TraceWriter as a context manager"
        assert self._stats is None, "no write after finish()"
        where = where or self.where
        origin = RowNames("row", self.rows) if origin is None else origin
        names = self.schema.names
        if (("token_id" in names) != (token_id is not None) or ("spec_logits" in names) != (spec_logits is not None)
                or ("token_text" in names) != (token_text is not None)):
            raise TraceError(f"{where}: every batch must carry the same optional columns ({names})")
        if weights is None:
            if self.meta.weighted:
                raise TraceError(f"{where}: a weighted trace needs the weights of every row")
            weights = uniform_weights(len(seq_id), self.meta.top_k)
        if len(seq_id) != len(token_pos) or len(seq_id) != len(layer):
            raise TraceError(f"{where}: columns seq_id, token_pos and layer have {len(seq_id)}, {len(token_pos)} "
                             f"and {len(layer)} rows")
        cols = {
            "seq_id": to_column_type(seq_id, "seq_id", where, origin),
            "token_pos": to_column_type(token_pos, "token_pos", where, origin),
            "layer": to_column_type(layer, "layer", where, origin),
            "experts": to_column_type(experts, "experts", where, origin),
            "weights": to_float32(weights, "weights", where, origin),
        }
        if token_id is not None:
            cols["token_id"] = to_column_type(token_id, "token_id", where, origin)
        if spec_logits is not None:
            cols["spec_logits"] = to_float32(spec_logits, "spec_logits", where, origin)
        validate_batch(self._bounds, **cols, where=where, origin=origin)
        if token_text is not None and len(token_text) != len(cols["seq_id"]):
            raise TraceError(f"{where}: column token_text has {len(token_text)} rows, seq_id has {len(cols['seq_id'])}")
        n = len(cols["seq_id"])
        if n == 0:
            return
        k, num_experts = self.meta.top_k, self._bounds.num_experts
        arrays = [
            pa.array(cols["seq_id"]),
            pa.array(cols["token_pos"]),
            pa.array(cols["layer"]),
            pa.FixedSizeListArray.from_arrays(pa.array(cols["experts"].ravel()), k),
            pa.FixedSizeListArray.from_arrays(pa.array(cols["weights"].ravel()), k) if self.meta.weighted
            else pa.nulls(n, pa.list_(pa.float32(), k)),
        ]
        if token_id is not None:
            arrays.append(pa.array(cols["token_id"]))
        if spec_logits is not None:
            arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(cols["spec_logits"].ravel()), num_experts))
        if token_text is not None:
            arrays.append(pa.array(token_text, type=pa.string()))
        self._writer.write_table(pa.Table.from_arrays(arrays, schema=self.schema))
        assert self._keys is not None
        self._keys.add(cols["seq_id"], cols["token_pos"], cols["layer"])
        self._layers_seen[cols["layer"]] = True
        self._max_expert = max(self._max_expert, int(cols["experts"].max()))
        self._batches.append((self.rows, where, origin))
        self.rows += n

    def _name(self, row: int) -> tuple[str, str]:
        """(where, name) of a written row, as its batch named it."""
        i = bisect.bisect_right([b[0] for b in self._batches], row) - 1
        first, where, origin = self._batches[i]
        return where, origin[row - first]

    def finish(self) -> dict[str, int]:
        """Run the whole-trace checks (once) and settle the inferred shape in `self.meta`; return
        {"rows", "sequences", "tokens"} (tokens: distinct (seq_id, token_pos) pairs)."""
        if self._stats is not None:
            return self._stats
        assert self._keys is not None, "use TraceWriter as a context manager"
        if self.rows == 0:
            raise TraceError(f"{self.where}: no rows were written (empty input?)")
        seen = np.flatnonzero(self._layers_seen)
        num_layers = int(seen[-1]) + 1 if "num_layers" in self.infer else self.meta.num_layers
        gaps = np.setdiff1d(np.arange(num_layers), seen)
        if len(gaps):
            more = f" and {len(gaps) - 10} more" if len(gaps) > 10 else ""
            raise TraceError(f"{self.where}: layer gap: no rows for layer(s) {gaps[:10].tolist()}{more} "
                             f"(layers must be contiguous 0..{num_layers - 1})")
        sequences, tokens, repeat = self._keys.check()
        if repeat is not None:
            earlier, later, seq, tok, layer = repeat
            (where_1, name_1), (where_2, name_2) = self._name(earlier), self._name(later)
            first = name_1 if where_1 == where_2 else f"{where_1}: {name_1}"
            raise TraceError(f"{where_2}: {name_2} repeats {first}: sequence {seq}, token {tok}, layer {layer}")
        num_experts = self._max_expert + 1 if "num_experts" in self.infer else self.meta.num_experts
        self.meta = replace(self.meta, num_layers=num_layers, num_experts=num_experts)
        self._stats = {"rows": self.rows, "sequences": sequences, "tokens": tokens}
        return self._stats

    def _final_metadata(self) -> dict[bytes, bytes]:
        """The file's key-value metadata, now that the shape is settled. Readers take the schema
        metadata from the serialised Arrow schema (`ARROW:schema`), so that entry is rewritten too."""
        meta = replace(self.meta, source_params=self.source_params)
        schema = self.schema.with_metadata(meta.to_metadata())
        return {**meta.to_metadata(), b"ARROW:schema": base64.b64encode(schema.serialize().to_pybytes())}

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self._writer is not None and self._keys is not None
        failure = exc
        try:
            if failure is None:
                self.finish()
                self._writer.add_key_value_metadata(self._final_metadata())
            self._writer.close()
        except BaseException as error:  # the whole-trace checks failed (or the disk did)
            failure = error
            with contextlib.suppress(Exception):
                self._writer.close()
        finally:
            self._keys.close()
        if failure is None:
            self._atomic.__exit__(None, None, None)  # renames into place
            log.info("wrote %s: %d rows, %d layers x %d experts, top-%d", self.path, self.rows,
                     self.meta.num_layers, self.meta.num_experts, self.meta.top_k)
            return
        self._atomic.__exit__(type(failure), failure, failure.__traceback__)  # discards the temporary file
        if failure is not exc:
            raise failure


def write_traces(path: str | Path, traces: Traces) -> None:
    """Write a whole in-memory trace (validated, atomic)."""
    with TraceWriter(path, traces.meta, traces.token_id is not None, traces.spec_logits is not None,
                     with_token_text=traces.token_text is not None) as writer:
        writer.write(traces.seq_id, traces.token_pos, traces.layer, traces.experts, traces.weights,
                     traces.token_id, traces.spec_logits, token_text=traces.token_text)


# --------------------------------------------------------------------------- reading


@contextlib.contextmanager
def _open_trace(path: str | Path) -> Iterator[tuple[pq.ParquetFile, TraceMeta]]:
    path = Path(path)
    with open_parquet(path, "extract_traces", TraceError) as pf:
        meta = TraceMeta.from_metadata(pf.schema_arrow.metadata, str(path))
        required = ["seq_id", "token_pos", "layer", "experts", "weights"]
        missing = [c for c in required if c not in pf.schema_arrow.names]
        if missing:
            raise TraceError(f"{path}: missing column(s) {missing}; a canonical trace has {required}")
        yield pf, meta


def _list_values(col: pa.ChunkedArray | pa.Array, name: str, width: int, where: str, origin: Any) -> np.ndarray:
    """A list column as a [rows, width] array of its values, naming the first row of another width."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type) or pa.types.is_fixed_size_list(col.type)):
        raise TraceError(f"{where}: column {name} must be a list column, got {col.type}")
    lengths = pc.fill_null(pc.list_value_length(col), -1).to_numpy(zero_copy_only=False)
    row = _first(lengths != width)
    if row is not None:
        got = "null" if lengths[row] < 0 else f"{lengths[row]} entries"
        raise TraceError(f"{_where(where, origin, row)}: {name} is {got}, expected {width} entries")
    return pc.list_flatten(col).to_numpy(zero_copy_only=False).reshape(len(col), width)


def _columns(table: pa.Table | pa.RecordBatch, meta: TraceMeta, where: str, origin: Any) -> dict[str, np.ndarray]:
    """The trace columns of `table` as numpy arrays of their on-disk types (each value checked to fit first)."""
    def plain(name: str) -> np.ndarray:
        return table.column(name).to_numpy(zero_copy_only=False)

    names = table.column_names
    cols = {name: to_column_type(plain(name), name, where, origin) for name in ("seq_id", "token_pos", "layer")}
    cols["experts"] = to_column_type(_list_values(table.column("experts"), "experts", meta.top_k, where, origin),
                                     "experts", where, origin)
    if meta.weighted:
        cols["weights"] = to_float32(_list_values(table.column("weights"), "weights", meta.top_k, where, origin),
                                     "weights", where, origin)
    else:
        cols["weights"] = uniform_weights(len(cols["seq_id"]), meta.top_k)
    if "token_id" in names:
        cols["token_id"] = to_column_type(plain("token_id"), "token_id", where, origin)
    if "spec_logits" in names:
        cols["spec_logits"] = to_float32(_list_values(table.column("spec_logits"), "spec_logits", meta.num_experts,
                                                      where, origin), "spec_logits", where, origin)
    return cols


def _token_text(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A string column as an object array whose rows share one Python string per distinct value."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    encoded = pc.dictionary_encode(pc.fill_null(col, ""))
    words = encoded.dictionary.to_numpy(zero_copy_only=False)
    index = encoded.indices.to_numpy(zero_copy_only=False)
    return words[index] if len(words) else np.full(len(col), None, dtype=object)


def _validated(table: pa.Table | pa.RecordBatch, meta: TraceMeta, where: str, origin: Any) -> Traces:
    cols = _columns(table, meta, where, origin)
    validate_batch(meta, **cols, where=where, origin=origin)
    text = _token_text(table.column("token_text")) if "token_text" in table.column_names else None
    return Traces(meta=meta, **cols, token_text=text)


def read_traces(path: str | Path) -> Traces:
    """Read and validate a canonical trace file (whole, in memory)."""
    with _open_trace(path) as (pf, meta):
        try:
            table = pf.read()
        except (pa.ArrowException, OSError) as exc:
            raise TraceError(f"{path}: cannot read: {exc}") from None
    return _validated(table, meta, str(path), RowNames("row"))


def iter_traces(path: str | Path, batch_rows: int = 1_000_000) -> Iterator[tuple[int, Traces]]:
    """A trace file in batches of about `batch_rows` rows, in file order, each validated:
    (first row, batch). Memory: one batch."""
    with _open_trace(path) as (pf, meta):
        first = 0
        batches = pf.iter_batches(batch_size=batch_rows)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except (pa.ArrowException, OSError) as exc:
                raise TraceError(f"{path}: cannot read the rows after row {first}: {exc}") from None
            yield first, _validated(batch, meta, str(path), RowNames("row", first))
            first += batch.num_rows


def read_trace_sequences(path: str | Path, max_rows: int) -> Iterator[Traces]:
    """A trace file in groups of whole sequences, in increasing seq_id order, each of about
    `max_rows` rows (a longer sequence comes alone), each validated: bounded memory.

    One pass reads the seq_id column to count rows per sequence; then each group is read with a
    filter on seq_id. A file sorted by seq_id (every source writes one when its input is in
    sequence order) is read about once in all, as Parquet row-group statistics skip the rest; an
    unsorted file is read once per group (logged).
    """
    with _open_trace(path) as (pf, meta):
        ids, counts, ordered = _sequence_counts(pf, str(path))
    if len(ids) == 0:  # no rows: the empty trace, as read_traces gives it
        yield read_traces(path)
        return
    group = (np.cumsum(counts) - counts) // max_rows  # sequences starting in the same max_rows window
    bounds = np.flatnonzero(np.r_[True, group[1:] != group[:-1], True])
    if not ordered and len(bounds) > 2:
        log.info("%s is not sorted by seq_id: reading it once per group of sequences (%d groups)", path,
                 len(bounds) - 1)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        first, last = int(ids[lo]), int(ids[hi - 1])
        try:
            table = pq.read_table(path, filters=[("seq_id", ">=", first), ("seq_id", "<=", last)])
        except (pa.ArrowException, OSError) as exc:
            raise TraceError(f"{path}: cannot read sequences {first}..{last}: {exc}") from None
        yield _validated(table, meta, f"{path} (sequences {first}..{last})", RowNames("row"))


def _sequence_counts(pf: pq.ParquetFile, where: str) -> tuple[np.ndarray, np.ndarray, bool]:
    """(sorted distinct seq_ids, rows of each, whether the file is in non-decreasing seq_id order)."""
    ids, counts = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    ordered, last, first = True, -1, 0
    try:
        for batch in pf.iter_batches(batch_size=1 << 20, columns=["seq_id"]):
            seq = to_column_type(batch.column(0).to_numpy(zero_copy_only=False), "seq_id", where,
                                 RowNames("row", first)).astype(np.int64)
            first += len(seq)
            if len(seq) == 0:
                continue
            ordered = ordered and seq[0] >= last and bool((seq[1:] >= seq[:-1]).all())
            last = int(seq[-1])
            batch_ids, batch_counts = np.unique(seq, return_counts=True)
            merged, index = np.unique(np.concatenate([ids, batch_ids]), return_inverse=True)
            counts = np.bincount(index, weights=np.concatenate([counts, batch_counts]),
                                 minlength=len(merged)).astype(np.int64)
            ids = merged
    except (pa.ArrowException, OSError) as exc:
        raise TraceError(f"{where}: cannot read the seq_id column: {exc}") from None
    return ids, counts, ordered


def read_trace_meta(path: str | Path) -> TraceMeta:
    """The trace's shape and source from its Parquet metadata, without reading the rows."""
    with _open_trace(path) as (_, meta):
        return meta
