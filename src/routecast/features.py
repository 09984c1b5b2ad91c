"""Encode a canonical trace into samples: the seed's features and the next layer's target.

One sample per (token, layer l) with `l + lookahead < num_layers`, both layer l and layer
l + lookahead routed for that token. Features are what is known once layer l has routed:

    layer      l
    secondary  the 2nd expert at layer l (-1 when top_k = 1)
    gating     the k gate weights at layer l
    history    primary expert at layers 0..l, stored +1 (0 = padding or a missing row),
               right-padded to history_len; entry j is always layer j
    position   min(token_pos / position_scale, 1)
    spec_logits (optional) the next layer's router logits on layer l's hidden state

Target: the primary expert at layer l + lookahead; target_set: the whole top-k there.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from routecast.artifacts import atomic_path
from routecast.params import FeaturesParams
from routecast.traces import TraceError, Traces

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeatureMeta:
    num_layers: int
    num_experts: int
    top_k: int
    history_len: int
    lookahead: int
    position_scale: float
    source: str = "unknown"

    def to_metadata(self) -> dict[bytes, bytes]:
        return {f.name.encode(): str(getattr(self, f.name)).encode() for f in fields(self)}

    @classmethod
    def from_metadata(cls, metadata: dict[bytes, bytes] | None, where: str) -> FeatureMeta:
        metadata = metadata or {}
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            raw = metadata.get(f.name.encode())
            if raw is None:
                if f.name == "source":
                    continue
                raise ValueError(f"{where}: Parquet metadata lacks {f.name!r}; was it written by encode_features?")
            kwargs[f.name] = {"int": int, "float": float, "str": str}[f.type](raw.decode())
        return cls(**kwargs)


@dataclass
class Features:
    """Samples column by column (numpy), in (sequence, token, layer) order."""

    meta: FeatureMeta
    seq_id: np.ndarray  # int32 [N]
    token_pos: np.ndarray  # int32 [N]
    layer: np.ndarray  # int16 [N]
    secondary: np.ndarray  # int16 [N]
    gating: np.ndarray  # float32 [N, k]
    history: np.ndarray  # int16 [N, history_len]
    position: np.ndarray  # float32 [N]
    target: np.ndarray  # int16 [N]
    target_set: np.ndarray  # int16 [N, k]
    spec_logits: np.ndarray | None = None  # float32 [N, E]
    is_val: np.ndarray | None = None  # bool [N], set by split_95_5 in the train split
    report: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.target)

    def take(self, index: np.ndarray) -> Features:
        """Rows `index` (an integer array or boolean mask)."""
        arrays = {f.name: getattr(self, f.name)[index] for f in fields(self)
                  if isinstance(getattr(self, f.name), np.ndarray)}
        return replace(self, **arrays, report={})


# --------------------------------------------------------------------------- encoding


def encode_features(traces: Traces, params: FeaturesParams) -> Features:
    """Vectorised encoder (numpy only, no per-row Python loop)."""
    start = time.perf_counter()
    meta = traces.meta
    L, k, E, la = meta.num_layers, meta.top_k, meta.num_experts, params.lookahead
    H = params.history_len or L
    if la >= L:
        raise ValueError(f"features.lookahead={la} leaves no sample: the trace has {L} layers")

    # Dense [token, layer] grids; a token is a (seq_id, token_pos) pair.
    key = (traces.seq_id.astype(np.int64) << 32) | traces.token_pos.astype(np.int64)
    tokens, token_idx = np.unique(key, return_inverse=True)
    n_tokens = len(tokens)
    cell = token_idx.astype(np.int64) * L + traces.layer
    counts = np.bincount(cell, minlength=n_tokens * L)
    if (counts > 1).any():
        bad = int(np.flatnonzero(counts > 1)[0])
        t, layer = divmod(bad, L)
        raise TraceError(f"duplicate rows for seq_id={tokens[t] >> 32}, token_pos={tokens[t] & 0xFFFFFFFF}, layer={layer}")
    present = (counts == 1).reshape(n_tokens, L)
    experts = np.full((n_tokens * L, k), -1, dtype=np.int16)
    experts[cell] = traces.experts
    experts = experts.reshape(n_tokens, L, k)
    gates = np.zeros((n_tokens * L, k), dtype=np.float32)
    gates[cell] = traces.weights
    gates = gates.reshape(n_tokens, L, k)

    # Sample grid: (token, layer l) for l < L - la, kept where layer l and l + la are both routed.
    have_layer = present[:, : L - la]
    have_target = present[:, la:]
    keep = have_layer & have_target
    t_idx, l_idx = np.nonzero(keep)  # row-major: token order, then layer

    hist_full = np.where(present, experts[:, :, 0] + 1, 0).astype(np.int16)[:, :H]
    if H > L:
        hist_full = np.pad(hist_full, ((0, 0), (0, H - L)))
    history = hist_full[t_idx] * (np.arange(H)[None, :] <= l_idx[:, None])

    seq_id = (tokens[t_idx] >> 32).astype(np.int32)
    token_pos = (tokens[t_idx] & 0xFFFFFFFF).astype(np.int32)
    spec = None
    if traces.spec_logits is not None:
        spec_grid = np.zeros((n_tokens * L, E), dtype=np.float32)
        spec_grid[cell] = traces.spec_logits
        spec = spec_grid.reshape(n_tokens, L, E)[t_idx, l_idx]

    feats = Features(
        meta=FeatureMeta(L, E, k, H, la, float(params.position_scale), meta.source),
        seq_id=seq_id,
        token_pos=token_pos,
        layer=l_idx.astype(np.int16),
        secondary=(experts[t_idx, l_idx, 1] if k > 1 else np.full(len(t_idx), -1)).astype(np.int16),
        gating=gates[t_idx, l_idx],
        history=history.astype(np.int16),
        position=np.minimum(token_pos / params.position_scale, 1.0).astype(np.float32),
        target=experts[t_idx, l_idx + la, 0],
        target_set=experts[t_idx, l_idx + la],
        spec_logits=spec,
    )
    candidates = n_tokens * (L - la)
    feats.report = {
        "trace_rows": len(traces),
        "tokens": n_tokens,
        "candidate_samples": candidates,
        "samples": len(feats),
        "dropped_missing_layer": int((~have_layer).sum()),
        "dropped_missing_target": int((have_layer & ~have_target).sum()),
        "history_entries_missing": int((~present[:, : L - 1]).sum()),
    }
    log.info("encoded %d samples from %d trace rows (%d tokens) in %.2fs; dropped %d (layer row missing) "
             "and %d (target row missing)", len(feats), len(traces), n_tokens, time.perf_counter() - start,
             feats.report["dropped_missing_layer"], feats.report["dropped_missing_target"])
    return feats


def encode_features_reference(traces: Traces, params: FeaturesParams) -> Features:
    """A plain per-row Python encoder: the definition the vectorised one must equal (tests, benchmark)."""
    meta = traces.meta
    L, k, la = meta.num_layers, meta.top_k, params.lookahead
    H = params.history_len or L
    rows: dict[tuple[int, int], dict[int, int]] = {}
    for i in range(len(traces)):
        rows.setdefault((int(traces.seq_id[i]), int(traces.token_pos[i])), {})[int(traces.layer[i])] = i
    out: dict[str, list] = {n: [] for n in ("seq_id", "token_pos", "layer", "secondary", "gating", "history",
                                            "position", "target", "target_set", "spec_logits")}
    for (seq, pos), by_layer in sorted(rows.items()):
        for layer in range(L - la):
            if layer not in by_layer or layer + la not in by_layer:
                continue
            i, j = by_layer[layer], by_layer[layer + la]
            history = [0] * H
            for h in range(min(layer + 1, H)):
                if h in by_layer:
                    history[h] = int(traces.experts[by_layer[h], 0]) + 1
            out["seq_id"].append(seq)
            out["token_pos"].append(pos)
            out["layer"].append(layer)
            out["secondary"].append(int(traces.experts[i, 1]) if k > 1 else -1)
            out["gating"].append(traces.weights[i])
            out["history"].append(history)
            out["position"].append(min(pos / params.position_scale, 1.0))
            out["target"].append(int(traces.experts[j, 0]))
            out["target_set"].append(traces.experts[j])
            if traces.spec_logits is not None:
                out["spec_logits"].append(traces.spec_logits[i])
    return Features(
        meta=FeatureMeta(L, meta.num_experts, k, H, la, float(params.position_scale), meta.source),
        seq_id=np.array(out["seq_id"], dtype=np.int32),
        token_pos=np.array(out["token_pos"], dtype=np.int32),
        layer=np.array(out["layer"], dtype=np.int16),
        secondary=np.array(out["secondary"], dtype=np.int16),
        gating=np.array(out["gating"], dtype=np.float32).reshape(-1, k),
        history=np.array(out["history"], dtype=np.int16).reshape(-1, H),
        position=np.array(out["position"], dtype=np.float32),
        target=np.array(out["target"], dtype=np.int16),
        target_set=np.array(out["target_set"], dtype=np.int16).reshape(-1, k),
        spec_logits=(np.array(out["spec_logits"], dtype=np.float32).reshape(-1, meta.num_experts)
                     if traces.spec_logits is not None else None),
    )


# --------------------------------------------------------------------------- Parquet I/O

_MATRIX_COLUMNS = ("gating", "history", "target_set", "spec_logits")


def features_to_table(feats: Features) -> pa.Table:
    columns: dict[str, pa.Array] = {}
    for f in fields(feats):
        value = getattr(feats, f.name)
        if not isinstance(value, np.ndarray):
            continue
        if f.name in _MATRIX_COLUMNS:
            columns[f.name] = pa.FixedSizeListArray.from_arrays(pa.array(value.ravel()), value.shape[1])
        else:
            columns[f.name] = pa.array(value)
    table = pa.table(columns)
    return table.replace_schema_metadata(feats.meta.to_metadata())


def write_features(path: str | Path, feats: Features) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(features_to_table(feats), tmp, compression="zstd")


def read_features(path: str | Path) -> Features:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found (run the stages before it: dvc repro)")
    table = pq.read_table(path)
    meta = FeatureMeta.from_metadata(table.schema.metadata, str(path))
    kwargs: dict[str, Any] = {}
    for f in fields(Features):
        if f.name in ("meta", "report") or f.name not in table.column_names:
            continue
        col = table.column(f.name).combine_chunks()
        if f.name in _MATRIX_COLUMNS:
            width = col.type.list_size if pa.types.is_fixed_size_list(col.type) else None
            flat = pc.list_flatten(col).to_numpy(zero_copy_only=False)
            kwargs[f.name] = flat.reshape(len(col), width or (len(flat) // max(len(col), 1)))
        else:
            kwargs[f.name] = col.to_numpy(zero_copy_only=False)
    missing = [f.name for f in fields(Features) if f.default is not None and f.name not in kwargs
               and f.name not in ("meta", "report")]
    if missing:
        raise ValueError(f"{path}: missing feature column(s) {missing}")
    return Features(meta=meta, **kwargs)
