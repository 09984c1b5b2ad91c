"""`deepseek_csv`: the DeepSeek-V2-Lite routing log (MoE-Beyond): one `prompt_N_data.csv` per
prompt, header `Layer ID,Batch Number,Token,Activated Expert IDs`, one row per (layer, token),
such as `1,0,ĠHow,"[8, 22, 43, 46, 63, 7]"`.

- Files: `extract.logs.path` is a folder (every `*.csv` in it), a glob or one file. Files named
  `prompt_N_data.csv` come first, by N (numerically), and are sequence N; other names follow,
  by name, as sequences max(N) + 1, max(N) + 2, ... One sequence per file.
- Rows are layer-major: all of the prompt's tokens for one layer, in token order, then the next
  layer (ascending). A token's position is its row index within its layer, so every layer of a
  file must list the same tokens (the same count, the same text at each position).
- layer = `Layer ID` minus the smallest `Layer ID` of the first file (1..26 -> 0..25; the
  model's dense layer 0 is absent). A file may lack whole layers (e.g. 1..5 and 7..26): those
  (token, layer) rows are absent from the trace, logged and counted (`missing_layers`).
- `Activated Expert IDs` is an unordered set of k expert ids (k from the first row; no gate
  weights): stored in ascending id order in an unweighted trace (`weighted: False`). `Token` is
  the tokenizer's string, kept as `token_text`. `Batch Number` is not used.

Each file is parsed whole with `pyarrow.csv` and checked with vectorised compute (Python runs
per row only to explain an error); rows are buffered until BATCH_ROWS and written, so memory
holds one file and one batch.
"""

from __future__ import annotations

import bisect
import contextlib
import csv
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from routecast.config.params import LogsParams
from routecast.data.traces import SHAPE_LIMIT, TraceError, TraceMeta, TraceWriter
from routecast.sources.logs.common import header_line, input_files, log_report, short, source_params

log = logging.getLogger(__name__)

BATCH_ROWS = 1 << 18  # rows buffered (from whole files) per TraceWriter.write
HEADER = ["Layer ID", "Batch Number", "Token", "Activated Expert IDs"]
_PROMPT_FILE = re.compile(r"prompt_(\d+)_data\.csv$")
_INT = r"^\s*[+-]?\d+\s*$"
_SET = r"^\s*\[\s*\d+(?:\s*,\s*\d+)*\s*\]\s*$"  # what the fast path accepts: other cells are explained
_MAX_LISTED = 100  # files listed by name in source_params.missing_layers


def _ordered_files(path: str) -> list[tuple[int, Path]]:
    """(seq_id, file): prompt_N_data.csv by N, then other names by name, numbered past the largest N."""
    files = input_files(path, (".csv",))
    numbered: dict[int, Path] = {}
    others = []
    for file in files:
        m = _PROMPT_FILE.fullmatch(file.name)
        if m is None:
            others.append(file)
            continue
        n = int(m.group(1))
        if n in numbered:
            raise TraceError(f"{file}: prompt {n} again (also {numbered[n]}): one file per prompt number")
        numbered[n] = file
    nxt = max(numbered, default=-1) + 1
    out = sorted(numbered.items())
    out += [(nxt + i, file) for i, file in enumerate(sorted(others, key=lambda f: (f.name, str(f))))]
    return out


def _check_header(file: Path) -> None:
    text = header_line(file, "utf-8-sig")
    names = [name.strip() for name in next(csv.reader([text.rstrip("\r\n")]), [])]
    if names != HEADER:
        raise TraceError(f"{file}: line 1: expected the header {','.join(HEADER)!r}, got {short(text.rstrip())}")


def _read_csv(file: Path) -> pa.Table:
    """The file's rows as strings, row i being line i + 2 (blank lines are rows, so they are reported)."""
    import pyarrow.csv as pacsv

    try:
        return pacsv.read_csv(
            file, read_options=pacsv.ReadOptions(column_names=HEADER, skip_rows=1),
            parse_options=pacsv.ParseOptions(ignore_empty_lines=False, newlines_in_values=False),
            convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in HEADER}))
    except pa.ArrowException as exc:
        raise _csv_error(file, exc) from None


def _csv_error(file: Path, exc: Exception) -> TraceError:
    """pyarrow names no line: find the first bad one with the csv module (only on this error path)."""
    with open(file, encoding="utf-8", errors="surrogateescape", newline="") as fh:
        lines = iter(fh)
        next(lines, None)
        for n, line in enumerate(lines, start=2):
            if any("\udc80" <= ch <= "\udcff" for ch in line):
                return TraceError(f"{file}: line {n}: not UTF-8 text")
            if not line.strip("\r\n"):
                return TraceError(f"{file}: line {n}: blank line")
            cells = next(csv.reader([line]), [])
            if len(cells) != len(HEADER) or line.count('"') % 2:
                return TraceError(f"{file}: line {n}: {len(cells)} columns, the header has {len(HEADER)} "
                                  f"(or a quoted cell runs past the line): {short(line.rstrip())}")
    return TraceError(f"{file}: cannot parse the CSV: {exc}")


def _first_false(mask: pa.Array | pa.ChunkedArray) -> int | None:
    if pc.all(mask).as_py():
        return None
    return int(np.argmin(mask.to_numpy(zero_copy_only=False)))


def _layer_ids(col: pa.ChunkedArray, file: Path) -> np.ndarray:
    bad = _first_false(pc.match_substring_regex(col, _INT))
    if bad is None:
        try:
            return pc.cast(pc.utf8_trim_whitespace(col), pa.int64()).to_numpy()
        except pa.ArrowInvalid:  # out of int64's range
            values = col.to_pylist()
            bad = next(i for i, v in enumerate(values) if not -2**63 <= int(v) < 2**63)
    raise TraceError(f"{file}: line {bad + 2}: Layer ID {short(col[bad].as_py())} is not an integer "
                     f"(a small whole number)")


def _explain_set(cell: str) -> str:
    """Why a set cell the fast path refused is bad."""
    text = cell.strip()
    if not (text.startswith("[") and text.endswith("]")):
        return f"expert set {short(cell)} is not a list [i, j, ...]"
    items = [s.strip() for s in text[1:-1].split(",")]
    if items == [""]:
        return "empty expert set []"
    for item in items:
        try:
            value = int(item)
        except ValueError:
            return f"expert set {short(cell)}: {short(item)} is not an integer"
        if value < 0:
            return f"expert set {short(cell)}: id {value} is negative"
    return f"expert set {short(cell)} is not a list [i, j, ...] of integers"


@dataclass
class _Sets:
    top_k: int | None = None  # from the first row of the first file
    first_where: str = ""


def _expert_sets(col: pa.ChunkedArray, file: Path, sets: _Sets, num_experts: int | None) -> np.ndarray:
    """The cells `[i, j, ...]` as [rows, k] int16 ids, each row sorted ascending; errors name the line."""
    bad = _first_false(pc.match_substring_regex(col, _SET))
    if bad is not None:
        raise TraceError(f"{file}: line {bad + 2}: {_explain_set(col[bad].as_py())}")
    lists = pc.split_pattern(pc.replace_substring_regex(col, r"[\[\]\s]", ""), ",")
    lengths = pc.list_value_length(lists).to_numpy()
    if sets.top_k is None:
        sets.top_k, sets.first_where = int(lengths[0]), f"line 2 of {file.name}"
    k = sets.top_k
    wrong = lengths != k
    if wrong.any():
        row = int(np.argmax(wrong))
        raise TraceError(f"{file}: line {row + 2}: {lengths[row]} expert ids {short(col[row].as_py())}, expected "
                         f"top_k={k} (as on {sets.first_where})")
    flat = pc.list_flatten(lists)
    digits = pc.utf8_length(flat).to_numpy()
    top = num_experts if num_experts is not None else SHAPE_LIMIT
    if (digits > 9).any():  # not a valid id: too long for the cast below to be safe
        row = int(np.argmax(digits > 9)) // k
        raise TraceError(f"{file}: line {row + 2}: expert set {short(col[row].as_py())}: an id is not below {top}")
    ids = pc.cast(flat, pa.int64()).to_numpy().reshape(-1, k)
    over = (ids >= top).any(axis=1)
    if over.any():
        row = int(np.argmax(over))
        what = f"extract.logs.num_experts={num_experts}" if num_experts is not None else f"the limit {SHAPE_LIMIT}"
        raise TraceError(f"{file}: line {row + 2}: expert set {short(col[row].as_py())}: id {ids[row].max()} is not "
                         f"below {what}")
    ids = np.sort(ids.astype(np.int16), axis=1)
    if k > 1:
        repeat = (ids[:, 1:] == ids[:, :-1]).any(axis=1)
        if repeat.any():
            row = int(np.argmax(repeat))
            raise TraceError(f"{file}: line {row + 2}: expert set {short(col[row].as_py())} repeats an id")
    return ids


@dataclass
class _File:
    """One file's rows, checked, ready to write."""

    seq_id: int
    file: Path
    layer: np.ndarray  # 0-based, per row
    token_pos: np.ndarray
    experts: np.ndarray  # [rows, k] int16, ascending
    token_text: pa.Array
    layers: list[int]  # the 0-based layers present
    base: int  # the Layer ID of layer 0


def _read_file(seq_id: int, file: Path, base: int | None, sets: _Sets, num_experts: int | None) -> _File:
    _check_header(file)
    table = _read_csv(file)
    n = table.num_rows
    if n == 0:
        raise TraceError(f"{file}: empty file: no rows after the header")
    ids = _layer_ids(table.column("Layer ID"), file)
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    runs = ids[starts]
    if base is None:
        base = int(runs.min())
    back = np.flatnonzero(np.diff(runs) < 0)
    if len(back):
        i = int(starts[back[0] + 1])
        raise TraceError(f"{file}: line {i + 2}: Layer ID {ids[i]} after Layer ID {ids[i - 1]}: rows must be "
                         "layer-major (all tokens of a layer, layers ascending)")
    if runs[0] < base:
        raise TraceError(f"{file}: line 2: Layer ID {runs[0]} is below the first file's smallest, {base} "
                         "(layers are counted from it)")
    if runs[-1] - base >= SHAPE_LIMIT:
        i = int(starts[-1])
        raise TraceError(f"{file}: line {i + 2}: Layer ID {runs[-1]}: more than {SHAPE_LIMIT} layers from {base}")
    lengths = np.diff(np.r_[starts, n])
    tokens = int(lengths[0])
    unequal = np.flatnonzero(lengths != tokens)
    if len(unequal):
        j = int(unequal[0])
        raise TraceError(f"{file}: line {starts[j] + 2}: unequal layers: Layer ID {runs[j]} has {lengths[j]} tokens, "
                         f"Layer ID {runs[0]} has {tokens}")
    text = table.column("Token").combine_chunks()
    if len(runs) > 1:
        same = pc.equal(text, pc.take(text, pa.array(np.tile(np.arange(tokens), len(runs)))))
        bad = _first_false(same)
        if bad is not None:
            raise TraceError(f"{file}: line {bad + 2}: token {short(text[bad].as_py())} at position {bad % tokens} "
                             f"of Layer ID {ids[bad]}, but {short(text[bad % tokens].as_py())} in Layer ID {runs[0]}")
    experts = _expert_sets(table.column("Activated Expert IDs"), file, sets, num_experts)
    layer = (ids - base).astype(np.int16)
    return _File(seq_id, file, layer, np.tile(np.arange(tokens, dtype=np.int32), len(runs)), experts, text,
                 [int(r - base) for r in runs], base)


@dataclass(frozen=True)
class _Lines:
    """Names row i of a batch of whole files: `FILE: line N` (`line N` for a batch of one file)."""

    files: list[str]
    starts: list[int]  # each file's first row in the batch

    def __getitem__(self, i: int) -> str:
        j = bisect.bisect_right(self.starts, i) - 1
        line = f"line {i - self.starts[j] + 2}"
        return line if len(self.files) == 1 else f"{self.files[j]}: {line}"


@dataclass
class _Batch:
    files: list[_File] = field(default_factory=list)
    rows: int = 0

    def flush(self, writer: TraceWriter, where: str) -> None:
        if not self.files:
            return
        fs = self.files
        starts = np.cumsum([0] + [len(f.layer) for f in fs[:-1]]).tolist()
        writer.write(np.repeat([f.seq_id for f in fs], [len(f.layer) for f in fs]),
                     np.concatenate([f.token_pos for f in fs]), np.concatenate([f.layer for f in fs]),
                     np.concatenate([f.experts for f in fs]), None,
                     token_text=pa.concat_arrays([f.token_text for f in fs]),
                     where=str(fs[0].file) if len(fs) == 1 else where,
                     origin=_Lines([str(f.file) for f in fs], starts))
        self.files, self.rows = [], 0


def import_deepseek_csv(params: LogsParams, out: Path) -> dict[str, Any]:
    """The DeepSeek-V2-Lite log: one `prompt_N_data.csv` per prompt (sequence N); unweighted sets."""
    began = time.perf_counter()
    files = _ordered_files(str(params.path))
    sets = _Sets()
    base: int | None = None
    present: list[tuple[str, list[int]]] = []  # (file, its 0-based layers), for the missing layers at the end
    rows = 0
    batch = _Batch()
    with contextlib.ExitStack() as stack:
        writer: TraceWriter | None = None
        for seq_id, file in tqdm(files, desc="import deepseek_csv", unit="file"):
            f = _read_file(seq_id, file, base, sets, params.num_experts)
            if writer is None:
                base = f.base
                assert sets.top_k is not None
                writer = stack.enter_context(_writer(params, out, sets.top_k, len(files), base))
            present.append((str(file), f.layers))
            batch.files.append(f)
            batch.rows += len(f.layer)
            rows += len(f.layer)
            if batch.rows >= BATCH_ROWS:
                batch.flush(writer, str(params.path))
        assert writer is not None
        batch.flush(writer, str(params.path))
        stats = writer.finish()
        num_layers = writer.meta.num_layers
        missing = {name: sorted(set(range(num_layers)) - set(layers)) for name, layers in present
                   if len(layers) != num_layers}
        missing_rows = stats["tokens"] * num_layers - rows
        for name, layers in list(missing.items())[:20]:
            log.warning("%s: no rows for layer(s) %s (0-based; Layer ID - %s): those (token, layer) rows are "
                        "absent", name, layers, base)
        if len(missing) > 20:
            log.warning("... and %d more files lack whole layers (listed in source_params.missing_layers)",
                        len(missing) - 20)
        writer.source_params.update(
            files=len(files), rows=rows, tokens=stats["tokens"], layer_id_base=base,
            missing_layers={"files": len(missing), "file_layers": sum(map(len, missing.values())),
                            "rows": missing_rows,
                            "by_file": {Path(k).name: v for k, v in list(missing.items())[:_MAX_LISTED]}})
    report = {"files": len(files), "sequences": stats["sequences"], "rows": rows, "tokens": stats["tokens"],
              "missing_token_layer_rows": missing_rows, "files_missing_layers": len(missing),
              "seconds": round(time.perf_counter() - began, 2)}
    log_report(params.path, report)
    return report


def _writer(params: LogsParams, out: Path, top_k: int, files: int, base: int) -> TraceWriter:
    meta = TraceMeta(num_layers=SHAPE_LIMIT, num_experts=params.num_experts or SHAPE_LIMIT, top_k=top_k,
                     source=params.model or "import:deepseek_csv", weighted=False,
                     source_params=source_params(params, files=files, layer_id_base=base))
    infer = ("num_layers",) if params.num_experts else ("num_layers", "num_experts")
    return TraceWriter(out, meta, where=str(params.path), infer=infer, with_token_text=True)
