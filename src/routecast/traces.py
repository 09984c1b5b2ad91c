"""The canonical routing trace (`data/traces.parquet`): schema, validation, streamed writing.

One row per (sequence, token, layer): `seq_id`, `token_pos`, `layer`, `experts` (k ids, highest
weight first), `weights` (their gate weights, summing to 1), optional `token_id` and
`spec_logits` (the next layer's router logits on this layer's hidden state). File metadata
holds `num_layers`, `num_experts`, `top_k`, `source` and `source_params`.

Every source writes through `TraceWriter`, which validates each batch before it is written
and renames the file into place only when the whole trace is valid.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from routecast.artifacts import atomic_path

log = logging.getLogger(__name__)

WEIGHT_SUM_ATOL = 1e-3  # float16/bfloat16 routers renormalise to within this of 1


class TraceError(ValueError):
    """A trace (or the file it came from) breaks the canonical schema; the message names where."""


@dataclass(frozen=True)
class TraceMeta:
    num_layers: int
    num_experts: int
    top_k: int
    source: str  # the generator, model or importer that produced the trace
    source_params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_layers < 1 or self.num_experts < 1 or not 1 <= self.top_k <= self.num_experts:
            raise TraceError(
                f"bad trace shape: num_layers={self.num_layers}, num_experts={self.num_experts}, top_k={self.top_k}"
            )

    def to_metadata(self) -> dict[bytes, bytes]:
        return {
            b"num_layers": str(self.num_layers).encode(),
            b"num_experts": str(self.num_experts).encode(),
            b"top_k": str(self.top_k).encode(),
            b"source": self.source.encode(),
            b"source_params": json.dumps(self.source_params, sort_keys=True, default=str).encode(),
        }

    @classmethod
    def from_metadata(cls, metadata: dict[bytes, bytes] | None, where: str) -> TraceMeta:
        metadata = metadata or {}
        missing = [k for k in (b"num_layers", b"num_experts", b"top_k") if k not in metadata]
        if missing:
            raise TraceError(f"{where}: Parquet metadata lacks {', '.join(m.decode() for m in missing)}")
        return cls(
            num_layers=int(metadata[b"num_layers"]),
            num_experts=int(metadata[b"num_experts"]),
            top_k=int(metadata[b"top_k"]),
            source=metadata.get(b"source", b"unknown").decode(),
            source_params=json.loads(metadata.get(b"source_params", b"{}")),
        )


@dataclass
class Traces:
    """A whole trace in memory, column by column."""

    meta: TraceMeta
    seq_id: np.ndarray  # int32 [N]
    token_pos: np.ndarray  # int32 [N]
    layer: np.ndarray  # int16 [N]
    experts: np.ndarray  # int16 [N, k]
    weights: np.ndarray  # float32 [N, k]
    token_id: np.ndarray | None = None  # int32 [N]
    spec_logits: np.ndarray | None = None  # float32 [N, E]

    def __len__(self) -> int:
        return len(self.seq_id)


def trace_schema(meta: TraceMeta, with_token_id: bool, with_spec_logits: bool) -> pa.Schema:
    fields = [
        pa.field("seq_id", pa.int32(), nullable=False),
        pa.field("token_pos", pa.int32(), nullable=False),
        pa.field("layer", pa.int16(), nullable=False),
        pa.field("experts", pa.list_(pa.int16(), meta.top_k), nullable=False),
        pa.field("weights", pa.list_(pa.float32(), meta.top_k), nullable=False),
    ]
    if with_token_id:
        fields.append(pa.field("token_id", pa.int32()))
    if with_spec_logits:
        fields.append(pa.field("spec_logits", pa.list_(pa.float32(), meta.num_experts)))
    return pa.schema(fields, metadata=meta.to_metadata())


def _where(where: str, origin: np.ndarray | None, row: int) -> str:
    if origin is not None:
        return f"{where}: {origin[row]}"
    return f"{where}: row {row}"


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
    origin: np.ndarray | None = None,
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

    def fail(mask: np.ndarray, message: str) -> None:
        if mask.any():
            row = int(np.flatnonzero(mask)[0])
            raise TraceError(f"{_where(where, origin, row)}: {message(row) if callable(message) else message}")

    fail(seq_id < 0, lambda r: f"seq_id {seq_id[r]} is negative")
    fail(token_pos < 0, lambda r: f"token_pos {token_pos[r]} is negative")
    fail((layer < 0) | (layer >= meta.num_layers),
         lambda r: f"layer {layer[r]} out of range [0, num_layers={meta.num_layers})")
    bad_expert = ((experts < 0) | (experts >= num_experts)).any(axis=1)
    fail(bad_expert, lambda r: f"expert id in {experts[r].tolist()} out of range [0, num_experts={num_experts})")
    if k > 1:
        ordered = np.sort(experts, axis=1)
        fail((ordered[:, 1:] == ordered[:, :-1]).any(axis=1), lambda r: f"experts {experts[r].tolist()} repeat an id")
    fail(~np.isfinite(weights).all(axis=1), lambda r: f"weights {weights[r].tolist()} are not finite")
    fail((weights < 0).any(axis=1), lambda r: f"weights {weights[r].tolist()} are negative")
    sums = weights.sum(axis=1, dtype=np.float64)
    fail(np.abs(sums - 1.0) > WEIGHT_SUM_ATOL, lambda r: f"weights {weights[r].tolist()} sum to {sums[r]:.6f}, not 1")
    if k > 1:
        fail((np.diff(weights, axis=1) > 1e-6).any(axis=1),
             lambda r: f"experts must be sorted by weight, highest first; weights are {weights[r].tolist()}")
    if token_id is not None:
        fail(token_id < 0, lambda r: f"token_id {token_id[r]} is negative")
    if spec_logits is not None:
        if spec_logits.shape != (n, num_experts):
            raise TraceError(f"{where}: spec_logits must be [{n}, num_experts={num_experts}], got {list(spec_logits.shape)}")
        fail(~np.isfinite(spec_logits).all(axis=1), "spec_logits are not finite")


class TraceWriter:
    """Stream batches of rows into a canonical trace file, validated, written atomically.

    >>> with TraceWriter("data/traces.parquet", meta) as w:
    ...     w.write(seq_id=..., token_pos=..., layer=..., experts=..., weights=...)

    The file appears only when the block exits without error and the trace as a whole is
    valid (every layer 0..num_layers-1 present); otherwise nothing is written.
    """

    def __init__(self, path: str | Path, meta: TraceMeta, with_token_id: bool = False,
                 with_spec_logits: bool = False) -> None:
        self.path = Path(path)
        self.meta = meta
        self.schema = trace_schema(meta, with_token_id, with_spec_logits)
        self.rows = 0
        self._layers_seen = np.zeros(meta.num_layers, dtype=bool)
        self._atomic = atomic_path(self.path)
        self._writer: pq.ParquetWriter | None = None

    def __enter__(self) -> TraceWriter:
        tmp = self._atomic.__enter__()
        self._writer = pq.ParquetWriter(tmp, self.schema, compression="zstd")
        return self

    def write(self, seq_id: Sequence[int] | np.ndarray, token_pos: Sequence[int] | np.ndarray,
              layer: Sequence[int] | np.ndarray, experts: np.ndarray, weights: np.ndarray,
              token_id: np.ndarray | None = None, spec_logits: np.ndarray | None = None,
              where: str | None = None, origin: np.ndarray | None = None) -> None:
        assert self._writer is not None, "use TraceWriter as a context manager"
        names = self.schema.names
        if ("token_id" in names) != (token_id is not None) or ("spec_logits" in names) != (spec_logits is not None):
            raise TraceError(f"{where or self.path}: every batch must carry the same optional columns ({names})")
        cols = {
            "seq_id": np.asarray(seq_id, dtype=np.int64),
            "token_pos": np.asarray(token_pos, dtype=np.int64),
            "layer": np.asarray(layer, dtype=np.int64),
            "experts": np.asarray(experts, dtype=np.int64),
            "weights": np.asarray(weights, dtype=np.float32),
        }
        if token_id is not None:
            cols["token_id"] = np.asarray(token_id, dtype=np.int64)
        if spec_logits is not None:
            cols["spec_logits"] = np.asarray(spec_logits, dtype=np.float32)
        validate_batch(self.meta, **cols, where=where or str(self.path), origin=origin)
        n = len(cols["seq_id"])
        if n == 0:
            return
        k, num_experts = self.meta.top_k, self.meta.num_experts
        arrays = [
            pa.array(cols["seq_id"].astype(np.int32)),
            pa.array(cols["token_pos"].astype(np.int32)),
            pa.array(cols["layer"].astype(np.int16)),
            pa.FixedSizeListArray.from_arrays(pa.array(cols["experts"].astype(np.int16).ravel()), k),
            pa.FixedSizeListArray.from_arrays(pa.array(cols["weights"].ravel()), k),
        ]
        if token_id is not None:
            arrays.append(pa.array(cols["token_id"].astype(np.int32)))
        if spec_logits is not None:
            arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(cols["spec_logits"].ravel()), num_experts))
        self._writer.write_table(pa.Table.from_arrays(arrays, schema=self.schema))
        self._layers_seen[np.unique(cols["layer"])] = True
        self.rows += n

    def _final_error(self) -> TraceError | None:
        if self.rows == 0:
            return TraceError(f"{self.path}: no rows were written (empty input?)")
        if not self._layers_seen.all():
            missing = np.flatnonzero(~self._layers_seen).tolist()
            return TraceError(
                f"{self.path}: layers must be contiguous 0..{self.meta.num_layers - 1}; no rows for layers {missing}"
            )
        return None

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self._writer is not None
        self._writer.close()
        error = self._final_error() if exc_type is None else None
        if error is not None:
            self._atomic.__exit__(TraceError, error, None)  # discards the temporary file
            raise error
        self._atomic.__exit__(exc_type, exc, tb)  # renames into place only on success
        if exc_type is None:
            log.info("wrote %s: %d rows, %d layers x %d experts, top-%d", self.path, self.rows,
                     self.meta.num_layers, self.meta.num_experts, self.meta.top_k)


def _list_column(table: pa.Table, name: str, width: int, dtype: Any, where: str) -> np.ndarray:
    col = table.column(name).combine_chunks()
    if len(col) == 0:
        return np.zeros((0, width), dtype=dtype)
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
    if (lengths != width).any():
        row = int(np.flatnonzero(lengths != width)[0])
        raise TraceError(f"{where}: row {row}: {name} has {lengths[row]} entries, expected {width}")
    return pc.list_flatten(col).to_numpy(zero_copy_only=False).astype(dtype).reshape(-1, width)


def read_traces(path: str | Path) -> Traces:
    """Read and validate a canonical trace file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found (run extract_traces first: dvc repro extract_traces)")
    try:
        table = pq.read_table(path)
    except pa.ArrowInvalid as exc:
        raise TraceError(f"{path}: not a Parquet file: {exc}") from None
    meta = TraceMeta.from_metadata(table.schema.metadata, str(path))
    required = ["seq_id", "token_pos", "layer", "experts", "weights"]
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise TraceError(f"{path}: missing column(s) {missing}; a canonical trace has {required}")
    traces = Traces(
        meta=meta,
        seq_id=table.column("seq_id").to_numpy().astype(np.int32),
        token_pos=table.column("token_pos").to_numpy().astype(np.int32),
        layer=table.column("layer").to_numpy().astype(np.int16),
        experts=_list_column(table, "experts", meta.top_k, np.int16, str(path)),
        weights=_list_column(table, "weights", meta.top_k, np.float32, str(path)),
        token_id=table.column("token_id").to_numpy().astype(np.int32) if "token_id" in table.column_names else None,
        spec_logits=(_list_column(table, "spec_logits", meta.num_experts, np.float32, str(path))
                     if "spec_logits" in table.column_names else None),
    )
    validate_batch(meta, traces.seq_id, traces.token_pos, traces.layer, traces.experts, traces.weights,
                   traces.token_id, traces.spec_logits, where=str(path))
    return traces


def write_traces(path: str | Path, traces: Traces) -> None:
    """Write a whole in-memory trace (validated, atomic)."""
    with TraceWriter(path, traces.meta, traces.token_id is not None, traces.spec_logits is not None) as writer:
        writer.write(traces.seq_id, traces.token_pos, traces.layer, traces.experts, traces.weights,
                     traces.token_id, traces.spec_logits)


def read_trace_meta(path: str | Path) -> TraceMeta:
    """The trace's shape and source from its Parquet metadata, without reading the rows."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found (run extract_traces first: dvc repro extract_traces)")
    return TraceMeta.from_metadata(pq.read_schema(path).metadata, str(path))
