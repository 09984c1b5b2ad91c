"""Import existing routing logs into the canonical trace (`extract.source: import`).

`extract.logs.format` picks the reader:

    jsonl      long-format JSON lines, one per (sequence, token, layer): field names mapped by
               `extract.logs.fields` (e.g. the patched-vLLM Mixtral log in shared/traces)
    flame_csv  one dense `layer_L.csv` per MoE layer, one row per token, one score column per
               expert (`expert_0..expert_{E-1}`), non-zero on the k chosen experts (FLAME-MoE)
    vllm_npy   vLLM `routed_experts` arrays `[seq_len, num_layers, k]`: one `.npy` per sequence
               (a file, directory or glob) or one `.npz` holding one array per sequence
    parquet    a canonical trace (validated and rewritten)

The shape (num_layers, num_experts, top_k) comes from the logs; `extract.logs.num_experts`
overrides the inferred expert count (largest id + 1), which undercounts when the highest
experts are never chosen. Every reader writes through `TraceWriter`, so nothing is written
unless the whole input is valid, and errors name the file and line (or row, or array entry).
Missing (token, layer) rows are kept missing: `encode_features` drops and counts the samples
that need them.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from routecast.params import LogsParams
from routecast.traces import TraceError, TraceMeta, TraceWriter, read_traces

log = logging.getLogger(__name__)

CHUNK_ROWS = 200_000  # rows per TraceWriter.write batch


def import_logs(params: LogsParams, out: str | Path) -> dict[str, Any]:
    """Write `out` (the canonical trace) from the logs `params.path`; return a report of counts."""
    if params.path is None:
        raise ValueError("extract.logs.path: must be set to import logs")
    readers = {"jsonl": import_jsonl, "flame_csv": import_flame_csv, "vllm_npy": import_vllm_npy,
               "parquet": import_parquet}
    report = readers[params.format](params, Path(out))
    log.info("imported %s (%s): %s", params.path, params.format,
             ", ".join(f"{k}={v}" for k, v in report.items()))
    return report


# --------------------------------------------------------------------------- helpers


def _source_params(params: LogsParams, **extra: Any) -> dict[str, Any]:
    out = {k: v for k, v in asdict(params).items() if v is not None}
    if params.format != "jsonl":
        out.pop("fields", None)
    out.update(extra)
    return out


def _expand(path: str, suffixes: tuple[str, ...]) -> list[Path]:
    """A file, a directory (its files with `suffixes`) or a glob -> sorted existing files."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix in suffixes and f.is_file())
        where = f"directory {p} has no {'/'.join(suffixes)} files"
    elif p.is_file():
        files = [p]
        where = ""
    else:
        files = sorted(Path(f) for f in glob.glob(path) if Path(f).is_file())
        where = f"{path}: no such file, directory or glob match"
    if not files:
        raise TraceError(f"extract.logs.path: {where}")
    return files


def _lines(index: np.ndarray, offset: int = 0) -> np.ndarray:
    """`origin` strings for TraceWriter.write: 'line N' for each entry of `index` (+ offset)."""
    return np.char.add("line ", (index + offset).astype(str))


def _renormalize(weights: np.ndarray, where: str, origin: np.ndarray) -> np.ndarray:
    sums = weights.sum(axis=1, keepdims=True, dtype=np.float64)
    bad = ~(np.isfinite(sums[:, 0]) & (sums[:, 0] > 0))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise TraceError(f"{where}: {origin[row]}: weights {weights[row].tolist()} cannot be renormalised "
                         f"(sum {sums[row, 0]})")
    return (weights / sums).astype(np.float32)


def _sort_by_weight(experts: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Order each row's experts by weight, highest first (stable); return how many rows moved."""
    if experts.shape[1] < 2:
        return experts, weights, 0
    order = np.argsort(-weights, axis=1, kind="stable")
    moved = int((order != np.arange(experts.shape[1])).any(axis=1).sum())
    if moved:
        experts = np.take_along_axis(experts, order, axis=1)
        weights = np.take_along_axis(weights, order, axis=1)
    return experts, weights, moved


def _check_layers(layers: np.ndarray, where: str, what: str = "layer") -> int:
    """Layers present must be exactly 0..L-1; return L."""
    present = np.unique(layers)
    if len(present) == 0:
        raise TraceError(f"{where}: no rows")
    if present[0] != 0:
        raise TraceError(f"{where}: {what}s must start at 0, the first present is {present[0]}")
    gaps = np.setdiff1d(np.arange(present[-1] + 1), present)
    if len(gaps):
        raise TraceError(f"{where}: {what} gap: no rows for {what}(s) {gaps[:10].tolist()} "
                         f"between 0 and {present[-1]} ({what}s must be contiguous 0..L-1)")
    return int(present[-1]) + 1


def _check_duplicates(seq_id: np.ndarray, token_pos: np.ndarray, layer: np.ndarray, where: str,
                      origin: np.ndarray) -> None:
    key = (seq_id.astype(np.int64) << 40) | (token_pos.astype(np.int64) << 16) | layer.astype(np.int64)
    order = np.argsort(key, kind="stable")
    dup = np.flatnonzero(key[order][1:] == key[order][:-1])
    if len(dup):
        first, second = order[dup[0]], order[dup[0] + 1]
        raise TraceError(f"{where}: {origin[second]} repeats {origin[first]}: sequence {seq_id[first]}, "
                         f"token {token_pos[first]}, layer {layer[first]}")


def _num_experts(params: LogsParams, max_id: int, where: str) -> int:
    if params.num_experts is None:
        return max_id + 1
    return params.num_experts  # ids >= num_experts are rejected by TraceWriter, naming the line


# --------------------------------------------------------------------------- jsonl


def _as_int(value: Any, name: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
        raise TraceError(f"{where}: field {name!r} must be an integer, got {value!r}")
    return int(value)


def import_jsonl(params: LogsParams, out: Path) -> dict[str, Any]:
    """Long-format JSON lines: one object per (sequence, token, layer)."""
    path = Path(params.path)
    if not path.is_file():
        raise TraceError(f"extract.logs.path: {path}: no such file (the jsonl format reads one file)")
    f = params.fields
    seq_ids: dict[Any, int] = {}  # non-integer sequence ids -> 0.. in order of appearance
    seq, tok, lay, exps, wts, line_no = [], [], [], [], [], []
    blank = 0
    k = None
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                blank += 1
                continue
            where = f"{path}: line {n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TraceError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(obj, dict):
                raise TraceError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            wanted = [name for name in (f.sequence, f.token, f.layer, f.experts, f.weights) if name is not None]
            missing = [name for name in wanted if name not in obj]
            if missing:
                raise TraceError(f"{where}: missing field(s) {missing} (mapped by extract.logs.fields; "
                                 f"the line has {sorted(obj)})")
            if f.sequence is None:
                s = 0
            elif isinstance(obj[f.sequence], str):
                s = seq_ids.setdefault(obj[f.sequence], len(seq_ids))
            else:
                s = _as_int(obj[f.sequence], f.sequence, where)
            experts = obj[f.experts]
            if not isinstance(experts, list) or not experts:
                raise TraceError(f"{where}: field {f.experts!r} must be a non-empty list, got {experts!r}")
            experts = [_as_int(e, f.experts, where) for e in experts]
            if f.weights is None:
                weights = [1.0 / len(experts)] * len(experts)
            else:
                weights = obj[f.weights]
                if not isinstance(weights, list) or len(weights) != len(experts):
                    raise TraceError(f"{where}: field {f.weights!r} must list one weight per expert "
                                     f"({len(experts)}), got {weights!r}")
                if not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights):
                    raise TraceError(f"{where}: field {f.weights!r} must hold numbers, got {weights!r}")
            if k is None:
                k = len(experts)
            elif len(experts) != k:
                raise TraceError(f"{where}: {len(experts)} experts, but earlier lines have top_k={k} "
                                 "(k must be constant)")
            seq.append(s)
            tok.append(_as_int(obj[f.token], f.token, where))
            lay.append(_as_int(obj[f.layer], f.layer, where))
            exps.append(experts)
            wts.append(weights)
            line_no.append(n)
    if not seq:
        raise TraceError(f"{path}: empty file: no routing rows ({blank} blank lines)")
    if seq_ids and len(seq_ids) != len(set(seq)):
        raise TraceError(f"{path}: field {f.sequence!r} mixes string and integer ids")

    seq_id = np.asarray(seq, dtype=np.int64)
    token_pos = np.asarray(tok, dtype=np.int64)
    layer = np.asarray(lay, dtype=np.int64)
    experts = np.asarray(exps, dtype=np.int64)
    weights = np.asarray(wts, dtype=np.float64)
    lines = np.asarray(line_no, dtype=np.int64)
    origin = _lines(lines)
    where = str(path)

    for name, arr in (("sequence", seq_id), ("token", token_pos), ("layer", layer), ("experts", experts)):
        neg = (arr < 0).reshape(len(arr), -1).any(axis=1)
        if neg.any():
            row = int(np.flatnonzero(neg)[0])
            raise TraceError(f"{where}: {origin[row]}: {name} {arr[row].tolist()} is negative")
    nan = ~np.isfinite(weights).all(axis=1)
    if nan.any():
        row = int(np.flatnonzero(nan)[0])
        raise TraceError(f"{where}: {origin[row]}: weights {weights[row].tolist()} are not finite")
    num_layers = _check_layers(layer, where)
    _check_duplicates(seq_id, token_pos, layer, where, origin)
    num_experts = _num_experts(params, int(experts.max()), where)
    if params.renormalize:
        weights = _renormalize(weights, where, origin)
    weights = weights.astype(np.float32)
    experts, weights, moved = _sort_by_weight(experts, weights)

    n_tokens = len(np.unique((seq_id << 32) | token_pos))
    report = {
        "lines_read": int(lines[-1]) if len(lines) else 0,
        "rows": len(seq_id),
        "blank_lines_skipped": blank,
        "sequences": len(np.unique(seq_id)),
        "tokens": n_tokens,
        "missing_token_layer_rows": n_tokens * num_layers - len(seq_id),
        "rows_resorted_by_weight": moved,
    }
    meta = TraceMeta(num_layers=num_layers, num_experts=num_experts, top_k=k,
                     source=params.model or "import:jsonl", source_params=_source_params(params, **report))
    with TraceWriter(out, meta) as writer:
        for lo in range(0, len(seq_id), CHUNK_ROWS):
            sl = slice(lo, lo + CHUNK_ROWS)
            writer.write(seq_id[sl], token_pos[sl], layer[sl], experts[sl], weights[sl], where=where,
                         origin=origin[sl])
    _log_report(path, report)
    return report


def _log_report(path: Path | str, report: dict[str, Any]) -> None:
    log.info("%s: read %d rows (%d tokens); %d (token, layer) rows absent from the log (their samples are "
             "dropped by encode_features); %d rows re-sorted by weight", path, report["rows"], report["tokens"],
             report["missing_token_layer_rows"], report.get("rows_resorted_by_weight", 0))


# --------------------------------------------------------------------------- flame_csv

_LAYER_FILE = re.compile(r"layer_(\d+)\.csv$")


def import_flame_csv(params: LogsParams, out: Path) -> dict[str, Any]:
    """Dense per-layer score CSVs (`layer_L.csv`: layer_id, token_id, expert_0..expert_{E-1})."""
    import pyarrow.csv as pacsv

    files = _expand(params.path, (".csv",))
    by_layer: dict[int, Path] = {}
    for file in files:
        m = _LAYER_FILE.search(file.name)
        if m is None:
            raise TraceError(f"{file}: the file name must be layer_<N>.csv (the layer comes from the name)")
        by_layer[int(m.group(1))] = file
    original = sorted(by_layer)
    gaps = sorted(set(range(original[0], original[-1] + 1)) - set(original))
    if gaps:
        raise TraceError(f"{params.path}: layer gap: files for layers {original[0]}..{original[-1]} but none for "
                         f"{gaps} (MoE layers must be contiguous)")
    tps = params.tokens_per_sequence

    def read(file: Path) -> tuple[np.ndarray, int]:
        try:
            table = pacsv.read_csv(file)
        except Exception as exc:  # pyarrow's messages carry the row
            raise TraceError(f"{file}: cannot parse CSV: {exc}") from None
        names = table.column_names
        expert_cols = [c for c in names if c.startswith("expert_")]
        if not expert_cols or expert_cols != [f"expert_{i}" for i in range(len(expert_cols))]:
            raise TraceError(f"{file}: line 1: expected columns expert_0..expert_N, got {names[:5]}...")
        if table.num_rows == 0:
            raise TraceError(f"{file}: empty file: no rows after the header")
        scores = np.column_stack([table.column(c).to_numpy(zero_copy_only=False).astype(np.float64)
                                  for c in expert_cols])
        return scores, len(expert_cols)

    # The first file fixes the shape; every file is checked against it.
    first_scores, num_experts = read(by_layer[original[0]])
    top_k = int((first_scores[0] != 0).sum())
    if top_k < 1:
        raise TraceError(f"{by_layer[original[0]]}: line 2: no non-zero expert score")
    if params.num_experts is not None and params.num_experts != num_experts:
        raise TraceError(f"{by_layer[original[0]]}: line 1: {num_experts} expert columns, "
                         f"but extract.logs.num_experts is {params.num_experts}")
    meta = TraceMeta(num_layers=len(original), num_experts=num_experts, top_k=top_k, source=params.model or "import:flame_csv",
                     source_params=_source_params(params, original_layers=original))
    rows = 0
    tokens: set[int] = set()
    with TraceWriter(out, meta) as writer:
        for layer, orig in enumerate(original):
            file = by_layer[orig]
            scores, e = (first_scores, num_experts) if layer == 0 else read(file)
            where = str(file)
            origin = _lines(np.arange(len(scores)), offset=2)  # line 1 is the header
            if e != num_experts:
                raise TraceError(f"{file}: line 1: {e} expert columns, {by_layer[original[0]].name} has {num_experts}")
            bad = ~np.isfinite(scores).all(axis=1)
            if bad.any():
                row = int(np.flatnonzero(bad)[0])
                raise TraceError(f"{file}: {origin[row]}: a score is missing or not finite")
            bad = (scores < 0).any(axis=1)
            if bad.any():
                row = int(np.flatnonzero(bad)[0])
                raise TraceError(f"{file}: {origin[row]}: negative score")
            nonzero = scores != 0
            counts = nonzero.sum(axis=1)
            if (counts != top_k).any():
                row = int(np.flatnonzero(counts != top_k)[0])
                raise TraceError(f"{file}: {origin[row]}: {counts[row]} non-zero expert scores, expected "
                                 f"top_k={top_k} (as on line 2 of {by_layer[original[0]].name})")
            # the k non-zero scores, highest first (ties: lower id first)
            order = np.argsort(-scores, axis=1, kind="stable")[:, :top_k]
            top = np.take_along_axis(scores, order, axis=1)
            weights = _renormalize(top, where, origin)
            row_idx = np.arange(len(scores), dtype=np.int64)
            seq_id = row_idx // tps if tps else np.zeros_like(row_idx)
            token_pos = row_idx % tps if tps else row_idx
            writer.write(seq_id, token_pos, np.full(len(scores), layer), order, weights, where=where, origin=origin)
            rows += len(scores)
            tokens.update(row_idx.tolist())
    n_tokens = len(tokens)
    report = {"files": len(original), "rows": rows, "tokens": n_tokens,
              "sequences": math.ceil(n_tokens / tps) if tps else 1,
              "missing_token_layer_rows": n_tokens * len(original) - rows,
              "original_layers": f"{original[0]}..{original[-1]}"}
    _log_report(params.path, report)
    return report


# --------------------------------------------------------------------------- vllm_npy


def _vllm_arrays(params: LogsParams) -> list[tuple[str, Any]]:
    """(label, loader) per sequence, in order: sorted .npy files, or the arrays of one .npz."""
    files = _expand(params.path, (".npy", ".npz"))
    if len(files) == 1 and files[0].suffix == ".npz":
        with np.load(files[0]) as npz:
            keys = list(npz.files)
        if not keys:
            raise TraceError(f"{files[0]}: empty .npz (no arrays)")
        return [(f"{files[0]}[{key!r}]", lambda key=key, f=files[0]: np.load(f)[key]) for key in keys]
    bad = [f for f in files if f.suffix != ".npy"]
    if bad:
        raise TraceError(f"{bad[0]}: expected .npy files (one sequence each) or a single .npz")
    return [(str(f), lambda f=f: np.load(f, mmap_mode="r", allow_pickle=False)) for f in files]


def import_vllm_npy(params: LogsParams, out: Path) -> dict[str, Any]:
    """vLLM `routed_experts` [seq_len, num_layers, k] per sequence; no weights -> uniform 1/k.

    vLLM's top-k kernels list the chosen experts in descending score order, so the first entry
    is taken as the primary expert; the gate weights are not recorded, so every weight is 1/k.
    """
    arrays = _vllm_arrays(params)
    shape, max_id = None, -1
    for label, load in arrays:  # first pass: shapes and the expert count (memory-mapped for .npy)
        try:
            a = load()
        except Exception as exc:
            raise TraceError(f"{label}: cannot read: {exc}") from None
        if a.ndim != 3:
            raise TraceError(f"{label}: expected [seq_len, num_layers, k], got shape {list(a.shape)}")
        if not np.issubdtype(a.dtype, np.integer):
            raise TraceError(f"{label}: expected integer expert ids, got dtype {a.dtype}")
        if shape is not None and a.shape[1:] != shape:
            raise TraceError(f"{label}: shape [*, {a.shape[1]}, {a.shape[2]}] differs from the first array's "
                             f"[*, {shape[0]}, {shape[1]}] (num_layers and k must be constant)")
        shape = a.shape[1:]
        if a.size:
            max_id = max(max_id, int(a.max()))
    if max_id < 0:
        raise TraceError(f"{params.path}: no routed tokens (every array is empty)")
    num_layers, k = shape
    num_experts = _num_experts(params, max_id, params.path)
    meta = TraceMeta(num_layers=num_layers, num_experts=num_experts, top_k=k, source=params.model or "import:vllm_npy",
                     source_params=_source_params(params, weights="uniform 1/k (vLLM routed_experts has no weights)",
                                                  sequences=len(arrays)))
    rows = 0
    with TraceWriter(out, meta) as writer:
        for seq, (label, load) in enumerate(arrays):
            a = np.asarray(load(), dtype=np.int64)
            T = a.shape[0]
            if T == 0:
                continue
            t, layer = np.divmod(np.arange(T * num_layers), num_layers)
            origin = np.char.add(np.char.add("token ", t.astype(str)), np.char.add(", layer ", layer.astype(str)))
            writer.write(np.full(T * num_layers, seq), t, layer, a.reshape(-1, k),
                         np.full((T * num_layers, k), 1.0 / k, dtype=np.float32), where=label, origin=origin)
            rows += T * num_layers
    report = {"sequences": len(arrays), "rows": rows, "tokens": rows // num_layers, "missing_token_layer_rows": 0}
    _log_report(params.path, report)
    return report


# --------------------------------------------------------------------------- parquet


def import_parquet(params: LogsParams, out: Path) -> dict[str, Any]:
    """A canonical trace file: validated by read_traces and rewritten (the metadata records the origin)."""
    path = Path(params.path)
    if not path.is_file():
        raise TraceError(f"extract.logs.path: {path}: no such file (the parquet format reads one trace file)")
    traces = read_traces(path)
    m = traces.meta
    if params.num_experts is not None and params.num_experts != m.num_experts:
        raise TraceError(f"{path}: its metadata says num_experts={m.num_experts}, "
                         f"extract.logs.num_experts is {params.num_experts}")
    traces.meta = TraceMeta(m.num_layers, m.num_experts, m.top_k, params.model or m.source,
                            {**m.source_params, "imported_from": str(path)})
    n_tokens = len(np.unique((traces.seq_id.astype(np.int64) << 32) | traces.token_pos))
    with TraceWriter(out, traces.meta, traces.token_id is not None, traces.spec_logits is not None) as writer:
        for lo in range(0, len(traces), CHUNK_ROWS):
            sl = slice(lo, lo + CHUNK_ROWS)
            writer.write(traces.seq_id[sl], traces.token_pos[sl], traces.layer[sl], traces.experts[sl],
                         traces.weights[sl], None if traces.token_id is None else traces.token_id[sl],
                         None if traces.spec_logits is None else traces.spec_logits[sl], where=str(path),
                         origin=np.char.add("row ", np.arange(lo, lo + len(traces.seq_id[sl])).astype(str)))
    report = {"rows": len(traces), "tokens": n_tokens,
              "missing_token_layer_rows": n_tokens * m.num_layers - len(traces)}
    _log_report(path, report)
    return report
