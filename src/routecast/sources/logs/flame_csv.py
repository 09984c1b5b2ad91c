"""`flame_csv`: one dense `layer_L.csv` per MoE layer, one row per token, one score column per
expert (`expert_0..expert_{E-1}`), non-zero on the k chosen experts (FLAME-MoE).

Streamed in CSV blocks: memory holds one block of CSV_BLOCK_BYTES and its rows.
"""

from __future__ import annotations

import contextlib
import itertools
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from routecast.config.params import LogsParams
from routecast.data.traces import SHAPE_LIMIT, RowNames, TraceError, TraceMeta, TraceWriter
from routecast.sources.logs.common import header_line, input_files, log_report, renormalize, short, source_params

CSV_BLOCK_BYTES = 16 << 20  # bytes parsed at a time
_LAYER_FILE = re.compile(r"layer_(\d+)\.csv$")
_CSV_NUMBER = re.compile(r"[ \t]*[-+]?(?:(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|inf|infinity)[ \t]*", re.IGNORECASE)


def _csv_header(file: Path) -> tuple[list[str], int]:
    """The column names on line 1, and the expert count (columns expert_0..expert_{E-1})."""
    header = header_line(file)
    names = [name.strip() for name in header.rstrip("\r\n").split(",")]
    expert_cols = [c for c in names if c.startswith("expert_")]
    if not expert_cols or expert_cols != [f"expert_{i}" for i in range(len(expert_cols))]:
        raise TraceError(f"{file}: line 1: expected columns expert_0..expert_N, got {short(names[:5])}...")
    return names, len(expert_cols)


def _csv_batches(file: Path, names: list[str], num_experts: int) -> Iterator[tuple[int, np.ndarray]]:
    """(index of the first row, scores [rows, E] as float64, NaN where a cell is empty) per CSV block.
    Quotes are not special and blank lines are rows, so row i is always line i + 2."""
    import pyarrow.csv as pacsv

    experts = [f"expert_{i}" for i in range(num_experts)]
    done = 0
    try:
        reader = pacsv.open_csv(
            file, read_options=pacsv.ReadOptions(column_names=names, skip_rows=1, block_size=CSV_BLOCK_BYTES),
            parse_options=pacsv.ParseOptions(quote_char=False, ignore_empty_lines=False),
            convert_options=pacsv.ConvertOptions(column_types={c: pa.float64() for c in experts},
                                                 include_columns=experts))
    except pa.ArrowException as exc:
        raise _csv_error(file, names, done, exc) from None
    with contextlib.closing(reader):
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                return
            except pa.ArrowException as exc:
                raise _csv_error(file, names, done, exc) from None
            if batch.num_rows:
                yield done, np.column_stack([col.to_numpy(zero_copy_only=False) for col in batch.columns])
            done += batch.num_rows


def _csv_error(file: Path, names: list[str], done: int, exc: Exception) -> TraceError:
    """pyarrow's CSV errors name no line: find the first bad line from row `done` on, by reading
    the lines again (only on this error path)."""
    import pyarrow.csv as pacsv

    nulls = set(pacsv.ConvertOptions().null_values)
    expert_idx = [i for i, name in enumerate(names) if name.startswith("expert_")]
    with open(file, encoding="utf-8", errors="surrogateescape", newline=None) as fh:
        for n, line in enumerate(fh, start=1):
            if n < done + 2:
                continue
            text = line.rstrip("\n")
            if not text:
                continue  # a blank line is a row of empty cells, reported as missing scores
            if any("\udc80" <= ch <= "\udcff" for ch in text):
                return TraceError(f"{file}: line {n}: not UTF-8 text")
            cells = text.split(",")
            if len(cells) != len(names):
                return TraceError(f"{file}: line {n}: {len(cells)} columns, the header has {len(names)}")
            for i in expert_idx:
                if cells[i].strip() not in nulls and not _CSV_NUMBER.fullmatch(cells[i]):
                    return TraceError(f"{file}: line {n}, column {names[i]}: {short(cells[i])} is not a number")
    return TraceError(f"{file}: cannot parse the CSV after line {done + 1}: {exc}")


def import_flame_csv(params: LogsParams, out: Path) -> dict[str, Any]:
    """Dense per-layer score CSVs (`layer_L.csv`: layer_id, token_id, expert_0..expert_{E-1})."""
    files = input_files(params.path, (".csv",))
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
    first_file = by_layer[original[0]]

    def batches(file: Path) -> tuple[Iterator[tuple[int, np.ndarray]], int]:
        names, e = _csv_header(file)
        return _csv_batches(file, names, e), e

    # The first row of the first file fixes top-k; every row is checked against it.
    first_batches, num_experts = batches(first_file)
    if num_experts > SHAPE_LIMIT:
        raise TraceError(f"{first_file}: line 1: {num_experts} expert columns; a trace holds at most {SHAPE_LIMIT}")
    if params.num_experts is not None and params.num_experts != num_experts:
        raise TraceError(f"{first_file}: line 1: {num_experts} expert columns, "
                         f"but extract.logs.num_experts is {params.num_experts}")
    try:
        first = next(first_batches)
    except StopIteration:
        raise TraceError(f"{first_file}: empty file: no rows after the header") from None
    top_k = int((first[1][0] != 0).sum())
    if top_k < 1:
        raise TraceError(f"{first_file}: line 2: no non-zero expert score")
    meta = TraceMeta(num_layers=len(original), num_experts=num_experts, top_k=top_k,
                     source=params.model or "import:flame_csv",
                     source_params=source_params(params, original_layers=original))
    rows = 0
    with TraceWriter(out, meta, where=str(params.path)) as writer:
        for layer, orig in enumerate(tqdm(original, desc="import flame_csv", unit="file")):
            file = by_layer[orig]
            if layer == 0:
                file_batches: Iterable[tuple[int, np.ndarray]] = itertools.chain([first], first_batches)
            else:
                file_batches, e = batches(file)
                if e != num_experts:
                    raise TraceError(f"{file}: line 1: {e} expert columns, {first_file.name} has {num_experts}")
            file_rows = 0
            for start, scores in file_batches:
                file_rows += len(scores)
                _write_flame_rows(writer, scores, start, layer, top_k, tps, str(file), first_file.name)
            if file_rows == 0:
                raise TraceError(f"{file}: empty file: no rows after the header")
            rows += file_rows
        stats = writer.finish()
    report = {"files": len(original), "rows": rows, "tokens": stats["tokens"], "sequences": stats["sequences"],
              "missing_token_layer_rows": stats["tokens"] * len(original) - rows,
              "original_layers": f"{original[0]}..{original[-1]}"}
    log_report(params.path, report)
    return report


def _write_flame_rows(writer: TraceWriter, scores: np.ndarray, start: int, layer: int, top_k: int,
                      tps: int | None, where: str, first_name: str) -> None:
    """Check one block of a layer's scores (rows start.. of the file) and write its rows."""
    origin = RowNames("line", start + 2)  # line 1 is the header
    bad = ~np.isfinite(scores).all(axis=1)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise TraceError(f"{where}: {origin[row]}: a score is missing or not finite")
    bad = (scores < 0).any(axis=1)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise TraceError(f"{where}: {origin[row]}: negative score")
    counts = (scores != 0).sum(axis=1)
    if (counts != top_k).any():
        row = int(np.flatnonzero(counts != top_k)[0])
        raise TraceError(f"{where}: {origin[row]}: {counts[row]} non-zero expert scores, expected "
                         f"top_k={top_k} (as on line 2 of {first_name})")
    # the k non-zero scores, highest first (ties: lower id first)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :top_k]
    weights = renormalize(np.take_along_axis(scores, order, axis=1), where, origin)
    row_idx = np.arange(start, start + len(scores), dtype=np.int64)
    seq_id = row_idx // tps if tps else np.zeros_like(row_idx)
    token_pos = row_idx % tps if tps else row_idx
    writer.write(seq_id, token_pos, np.full(len(scores), layer), order, weights, where=where, origin=origin)
