"""`jsonl`: long-format JSON lines, one per (sequence, token, layer), with field names mapped by
`extract.logs.fields` (e.g. the patched-vLLM Mixtral log in shared/traces); plain or
gzip-compressed (read transparently; other compression is named and refused).

Streamed in blocks of whole lines: memory holds two blocks of JSON_BLOCK_BYTES and their rows
(the next block is parsed in a background thread while this one is checked and written).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import json
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from routecast.config.params import LogFields, LogsParams
from routecast.data.traces import SHAPE_LIMIT, RowNames, TraceError, TraceMeta, TraceWriter, int_error, to_float32
from routecast.sources.logs.common import MAX_LINE_BYTES, log_report, renormalize, short, source_params

JSON_BLOCK_BYTES = 16 << 20  # bytes parsed at a time (whole lines); under glibc's 32 MiB mmap
# threshold, so buffers are reused rather than mapped (and page-faulted) afresh for every block


def _sort_by_weight(experts: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Order each row's experts by weight, highest first (stable); return how many rows moved."""
    k = experts.shape[1]
    if k < 2:
        return experts, weights, 0
    if k == 2:  # the common case, without a per-row sort
        moved = weights[:, 1] > weights[:, 0]
        if moved.any():
            experts, weights = experts.copy(), weights.copy()
            experts[moved], weights[moved] = experts[moved][:, ::-1], weights[moved][:, ::-1]
        return experts, weights, int(moved.sum())
    order = np.argsort(-weights, axis=1, kind="stable")
    moved = int((order != np.arange(k)).any(axis=1).sum())
    if moved:
        experts = np.take_along_axis(experts, order, axis=1)
        weights = np.take_along_axis(weights, order, axis=1)
    return experts, weights, moved


def _check_fits(values: np.ndarray, field: str, column: str, where: str, origin: Any) -> None:
    """Name the first row (and the log's field) whose value does not fit the trace column's type."""
    top = int(np.iinfo(np.int16 if column in ("layer", "experts") else np.int32).max)
    rows = values.reshape(len(values), -1)
    bad = (rows < 0) | (rows > top)
    hit = bad.any(axis=1)
    if hit.any():
        row = int(np.flatnonzero(hit)[0])
        value = int(rows[row][bad[row]][0])
        shown = f"{rows[row].tolist()}: id " if column == "experts" else ""
        raise TraceError(f"{where}: {origin[row]}: field {field!r}: {shown}{int_error(column, value)}")


_END = object()


def _prefetch(items: Iterator[Any]) -> Iterator[Any]:
    """Yield `items`, producing the next one in a background thread while the caller works on this
    one (pyarrow's parsers and zlib release the GIL, so reading overlaps checking and writing)."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        try:
            pending = pool.submit(next, items, _END)
            while (item := pending.result()) is not _END:
                pending = pool.submit(next, items, _END)
                yield item
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            close = getattr(items, "close", None)
            if close is not None:
                close()


# Magic numbers of compressed files that are not read (gzip is), to say so instead of "not UTF-8".
_COMPRESSED = {b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd", b"PK\x03\x04": "zip",
               b"\x04\x22\x4d\x18": "lz4"}
_JSON_WHITESPACE = b" \t\r"


def _open_log(path: Path) -> BinaryIO:
    """The log's bytes: gzip is decompressed on the fly (by its magic number, whatever the name)."""
    with open(path, "rb") as fh:
        magic = fh.read(6)
    if magic[:2] == b"\x1f\x8b":
        return gzip.open(path, "rb")  # type: ignore[return-value]
    for signature, name in _COMPRESSED.items():
        if magic.startswith(signature):
            raise TraceError(f"{path}: {name}-compressed, which is not read (gzip is read as it is): "
                             "decompress it first")
    return open(path, "rb")


def _blocks(fh: BinaryIO, where: str) -> Iterator[memoryview]:
    """Whole lines, JSON_BLOCK_BYTES at a time (the last block may lack its final newline)."""
    carry = b""
    while True:
        try:
            chunk = fh.read(JSON_BLOCK_BYTES)
        except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
            raise TraceError(f"{where}: cannot read it to the end (corrupt or truncated gzip data?): {exc}") from None
        if not chunk:
            if carry:
                yield memoryview(carry)
            return
        data = carry + chunk if carry else chunk
        cut = data.rfind(b"\n") + 1
        if cut == 0:
            if len(data) > MAX_LINE_BYTES:
                raise TraceError(f"{where}: a line longer than {MAX_LINE_BYTES >> 20} MiB: not a JSON-lines file?")
            carry = data
            continue
        carry = data[cut:]
        yield memoryview(data)[:cut]


@dataclass
class _JsonlSpec:
    """What the first data line settles for the whole log: top-k, and whether sequence ids are
    strings (they must all be strings or all integers)."""

    fields: LogFields
    where: str
    settled: bool = False
    k: int | None = None
    seq_is_str: bool = False
    parse_options: Any = None

    def settle(self, line: bytes) -> None:
        """From the first non-blank line; a bad line is left to `_parse_slow` to report."""
        self.settled = True
        try:
            obj = json.loads(line.decode("utf-8"))
        except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            return
        f = self.fields
        if not isinstance(obj, dict) or not isinstance(obj.get(f.experts), list) or not obj[f.experts]:
            return
        self.k = len(obj[f.experts])
        self.seq_is_str = f.sequence is not None and isinstance(obj.get(f.sequence), str)
        import pyarrow.json as pajson

        columns = [(f.token, pa.int64()), (f.layer, pa.int64()), (f.experts, pa.list_(pa.int64()))]
        if f.sequence is not None:
            columns.append((f.sequence, pa.string() if self.seq_is_str else pa.int64()))
        if f.weights is not None:
            columns.append((f.weights, pa.list_(pa.float64())))
        self.parse_options = pajson.ParseOptions(explicit_schema=pa.schema(columns),
                                                 unexpected_field_behavior="ignore")


@dataclass
class _Block:
    """The rows of one block of lines, not yet checked for range."""

    seq: Any  # int64 array, or the raw string ids (a pyarrow array or a list), mapped in order later
    tok: np.ndarray  # int64
    layer: np.ndarray  # int64
    experts: np.ndarray  # int64 [n, k]
    weights: np.ndarray | None  # float64 [n, k]; None: uniform
    origin: RowNames  # 'line N' of each row
    blank: int  # blank lines skipped
    last_line: int  # the last line holding a row (0: none)
    size: int  # bytes
    lines: int  # lines in the block


@dataclass(frozen=True)
class _Lines:
    """Where the lines of a block are: their count, the offsets of their starts and ends, and
    which hold something (not blank: JSON whitespace only)."""

    count: int
    starts: np.ndarray
    ends: np.ndarray
    kept: np.ndarray | None  # bool per line; None: every line starts with "{", so none is blank

    @classmethod
    def of(cls, data: np.ndarray) -> _Lines:
        newlines = np.flatnonzero(data == 10)
        count = len(newlines) + int(len(data) > 0 and data[-1] != 10)
        starts = np.r_[0, newlines + 1][:count]
        ends = np.r_[newlines, len(data)][:count]
        if (data[starts] == ord("{")).all():
            return cls(count, starts, ends, None)
        raw = data.tobytes()
        kept = np.array([bool(raw[a:b].strip(_JSON_WHITESPACE)) for a, b in zip(starts, ends)], dtype=bool)
        return cls(count, starts, ends, kept)

    @property
    def rows(self) -> int:
        return self.count if self.kept is None else int(self.kept.sum())


def _parse_block(view: memoryview, first_line: int, spec: _JsonlSpec) -> _Block:
    """Parse a block of whole lines (the first numbered `first_line`): with pyarrow's JSON reader
    when the block is plain (one object per line, nothing that pyarrow and `_parse_slow` would
    read differently), otherwise line by line, which reports the first bad line exactly."""
    data = np.frombuffer(view, dtype=np.uint8)
    lines = _Lines.of(data)
    if not spec.settled and lines.rows:
        i = 0 if lines.kept is None else int(np.argmax(lines.kept))
        spec.settle(view[lines.starts[i]:lines.ends[i]].tobytes())
    fast = _parse_fast(view, data, first_line, lines, spec)
    return fast if fast is not None else _parse_slow(view.tobytes(), first_line, lines.count, spec)


def _parse_fast(view: memoryview, data: np.ndarray, first_line: int, lines: _Lines, spec: _JsonlSpec) -> _Block | None:
    """pyarrow.json on the block, or None when it cannot stand for `_parse_slow`: an error, a null
    (missing field), a list of the wrong length, invalid UTF-8 (pyarrow skips ignored fields
    unchecked), or rows that are not one per non-blank line (pyarrow reads `{..}{..}` as two)."""
    import pyarrow.json as pajson

    if spec.parse_options is None or spec.k is None:
        return None
    if len(data) and data.max() >= 128:  # not ASCII: pyarrow reads it only if it is UTF-8 throughout
        try:
            str(view, "utf-8")
        except UnicodeDecodeError:
            return None
    try:
        table = pajson.read_json(pa.BufferReader(pa.py_buffer(view)), parse_options=spec.parse_options)
    except pa.ArrowException:
        return None
    n = lines.rows
    if table.num_rows != n or any(col.null_count for col in table.columns):
        return None
    f, k = spec.fields, spec.k

    def matrix(name: str) -> np.ndarray | None:
        """A list column as [rows, k], or None if a list has another length or holds a null."""
        parts = []
        for chunk in table.column(name).chunks:
            offsets = chunk.offsets.to_numpy()
            if (offsets[1:] - offsets[:-1] != k).any():
                return None
            values = chunk.values.slice(offsets[0], offsets[-1] - offsets[0])
            if values.null_count:
                return None
            parts.append(values.to_numpy())
        return np.concatenate(parts).reshape(n, k) if parts else np.zeros((0, k))

    experts = matrix(f.experts)
    weights = matrix(f.weights) if f.weights is not None else None
    if experts is None or (f.weights is not None and weights is None):
        return None
    if f.sequence is None:
        seq: Any = np.zeros(n, dtype=np.int64)
    elif spec.seq_is_str:
        seq = table.column(f.sequence).combine_chunks()
    else:
        seq = table.column(f.sequence).to_numpy()
    if lines.kept is None:
        origin = RowNames("line", first_line)
        last = first_line + lines.count - 1 if n else 0
    else:
        numbers = np.flatnonzero(lines.kept) + first_line
        origin = RowNames("line", numbers=numbers)
        last = int(numbers[-1]) if n else 0
    return _Block(seq=seq, tok=table.column(f.token).to_numpy(), layer=table.column(f.layer).to_numpy(),
                  experts=experts, weights=weights, origin=origin, blank=lines.count - n, last_line=last,
                  size=len(data), lines=lines.count)


def _as_int(value: Any, field: str, column: str, where: str) -> int:
    """A JSON number that is a whole number (3 or 3.0) as an int; one beyond int64 is refused here,
    with the same words as the range check that catches the rest."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TraceError(f"{where}: field {field!r} must be an integer, got {short(value)}")
    if isinstance(value, float):
        if not value.is_integer():  # also inf and nan
            raise TraceError(f"{where}: field {field!r} must be an integer, got {short(value)}")
        value = int(value)
    if not -2**63 <= value < 2**63:
        raise TraceError(f"{where}: field {field!r}: {int_error(column, value)}")
    return value


def _parse_slow(data: bytes, first_line: int, n_lines: int, spec: _JsonlSpec) -> _Block:
    """Line by line with `json`: the definition of what a valid line is; raises on the first bad one."""
    f, k = spec.fields, spec.k
    seq, tok, lay, exps, wts, numbers = [], [], [], [], [], []
    blank = 0
    for i, raw in enumerate(data.split(b"\n", n_lines)[:n_lines]):
        n = first_line + i
        if not raw.strip(_JSON_WHITESPACE):
            blank += 1
            continue
        where = f"{spec.where}: line {n}"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise TraceError(f"{where}: not UTF-8 text (byte {raw[exc.start]:#04x} at column {exc.start + 1}); "
                             "a routing log is JSON lines, plain or gzip-compressed") from None
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TraceError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        except RecursionError:
            raise TraceError(f"{where}: not valid JSON (nested too deeply)") from None
        if not isinstance(obj, dict):
            raise TraceError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        wanted = [name for name in (f.sequence, f.token, f.layer, f.experts, f.weights) if name is not None]
        missing = [name for name in wanted if name not in obj]
        if missing:
            raise TraceError(f"{where}: missing field(s) {missing} (mapped by extract.logs.fields; "
                             f"the line has {short(sorted(obj))})")
        if f.sequence is None:
            s: Any = 0
        elif isinstance(obj[f.sequence], str) != spec.seq_is_str:
            first = "a string" if spec.seq_is_str else "not a string"
            raise TraceError(f"{where}: field {f.sequence!r} is {short(obj[f.sequence])}, but on the first line it "
                             f"is {first} (sequence ids must be all strings or all integers)")
        else:
            s = obj[f.sequence] if spec.seq_is_str else _as_int(obj[f.sequence], f.sequence, "seq_id", where)
        experts = obj[f.experts]
        if not isinstance(experts, list) or not experts:
            raise TraceError(f"{where}: field {f.experts!r} must be a non-empty list, got {short(experts)}")
        experts = [_as_int(e, f.experts, "experts", where) for e in experts]
        if k is None or len(experts) != k:
            raise TraceError(f"{where}: {len(experts)} experts, but earlier lines have top_k={k} "
                             "(k must be constant)")
        if f.weights is not None:
            weights = obj[f.weights]
            if not isinstance(weights, list) or len(weights) != len(experts):
                raise TraceError(f"{where}: field {f.weights!r} must list one weight per expert "
                                 f"({len(experts)}), got {short(weights)}")
            if not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights):
                raise TraceError(f"{where}: field {f.weights!r} must hold numbers, got {short(weights)}")
            try:
                wts.append([float(w) for w in weights])
            except OverflowError:
                raise TraceError(f"{where}: field {f.weights!r}: a weight is too large ({short(weights)})") from None
        seq.append(s)
        tok.append(_as_int(obj[f.token], f.token, "token_pos", where))
        lay.append(_as_int(obj[f.layer], f.layer, "layer", where))
        exps.append(experts)
        numbers.append(n)
    rows = len(numbers)
    width = k or 1
    return _Block(seq=seq if spec.seq_is_str else np.asarray(seq, dtype=np.int64).reshape(rows),
                  tok=np.asarray(tok, dtype=np.int64).reshape(rows),
                  layer=np.asarray(lay, dtype=np.int64).reshape(rows),
                  experts=np.asarray(exps, dtype=np.int64).reshape(rows, width),
                  weights=np.asarray(wts, dtype=np.float64).reshape(rows, width) if f.weights is not None else None,
                  origin=RowNames("line", numbers=np.asarray(numbers, dtype=np.int64)), blank=blank,
                  last_line=numbers[-1] if numbers else 0, size=len(data), lines=n_lines)


def _parsed_blocks(path: Path, spec: _JsonlSpec) -> Iterator[_Block]:
    first_line = 1
    with _open_log(path) as fh:
        for view in _blocks(fh, spec.where):
            block = _parse_block(view, first_line, spec)
            first_line += block.lines
            yield block


def _string_ids(raw: Any, seq_ids: dict[str, int]) -> np.ndarray:
    """String sequence ids -> 0, 1, ... in order of first appearance in the log (`seq_ids` carries on)."""
    values = pa.array(raw, type=pa.string()) if isinstance(raw, list) else raw
    distinct = pc.unique(values)
    index = pc.index_in(values, value_set=distinct).to_numpy(zero_copy_only=False)
    _, first_seen = np.unique(index, return_index=True)
    for i in np.argsort(first_seen, kind="stable"):  # new ids in order of appearance in this block
        seq_ids.setdefault(distinct[int(i)].as_py(), len(seq_ids))
    lookup = np.array([seq_ids[v] for v in distinct.to_pylist()], dtype=np.int64)
    return lookup[index]


def import_jsonl(params: LogsParams, out: Path) -> dict[str, Any]:
    """Long-format JSON lines: one object per (sequence, token, layer), streamed in blocks."""
    path = Path(params.path)
    if not path.is_file():
        raise TraceError(f"extract.logs.path: {path}: no such file (the jsonl format reads one file)")
    f = params.fields
    where = str(path)
    spec = _JsonlSpec(f, where)
    seq_ids: dict[str, int] = {}  # string sequence ids -> 0.. in order of appearance
    chunk_ids: dict[tuple[int, int], int] = {}  # (sequence, token // tokens_per_sequence) -> 0.. in order
    rows = blank = moved = last_line = skipped = 0
    with contextlib.ExitStack() as stack:
        blocks = stack.enter_context(contextlib.closing(_prefetch(_parsed_blocks(path, spec))))
        with open(path, "rb") as fh:
            compressed = fh.read(2) == b"\x1f\x8b"  # then the bar counts decompressed bytes, total unknown
        bar = stack.enter_context(tqdm(total=None if compressed else path.stat().st_size, unit="B", unit_scale=True,
                                       desc="import jsonl"))
        writer = None
        for block in blocks:
            bar.update(block.size)
            blank += block.blank
            n = len(block.tok)
            if n == 0:
                continue
            k = block.experts.shape[1]
            if writer is None:
                writer = stack.enter_context(_jsonl_writer(params, out, k, where, block.origin[0]))
            seq = _string_ids(block.seq, seq_ids) if spec.seq_is_str else block.seq
            for values, field, column in ((seq, f.sequence, "seq_id"), (block.tok, f.token, "token_pos"),
                                          (block.layer, f.layer, "layer"), (block.experts, f.experts, "experts")):
                _check_fits(values, field or "sequence", column, where, block.origin)
            if params.sequences is not None:
                keep = np.isin(seq, params.sequences)
                skipped += int((~keep).sum())
                if not keep.any():
                    continue
                block = _take_rows(block, keep)
                seq, n = seq[keep], int(keep.sum())
            if params.tokens_per_sequence:
                seq = _chunk_ids(seq, block.tok // params.tokens_per_sequence, chunk_ids)
            if block.weights is None:
                weights = np.full((n, k), 1.0 / k, dtype=np.float32)
            elif params.renormalize:
                weights = renormalize(block.weights, where, block.origin)
            else:
                weights = to_float32(block.weights, "weights", where, block.origin)
            experts, weights, m = _sort_by_weight(block.experts, weights)
            writer.write(seq, block.tok, block.layer, experts, weights, where=where, origin=block.origin)
            rows += n
            moved += m
            last_line = block.last_line
        if writer is None:
            if skipped:
                raise TraceError(f"{path}: no rows of sequences {params.sequences} (extract.logs.sequences); "
                                 f"{skipped} rows of other sequences")
            raise TraceError(f"{path}: empty file: no routing rows ({blank} blank lines)")
        stats = writer.finish()
        report = {
            "lines_read": last_line,
            "rows": rows,
            "blank_lines_skipped": blank,
            "sequences": stats["sequences"],
            "tokens": stats["tokens"],
            "missing_token_layer_rows": stats["tokens"] * writer.meta.num_layers - rows,
            "rows_resorted_by_weight": moved,
            "rows_of_other_sequences_skipped": skipped,
        }
        writer.source_params.update(report)
    log_report(path, report)
    return report


def _take_rows(block: _Block, keep: np.ndarray) -> _Block:
    """The rows `keep` (a mask) of a parsed block (its sequence ids, already mapped, are the caller's)."""
    return dataclasses.replace(block, seq=None, tok=block.tok[keep], layer=block.layer[keep],
                               experts=block.experts[keep],
                               weights=None if block.weights is None else block.weights[keep],
                               origin=block.origin.take(keep))


def _chunk_ids(seq: np.ndarray, chunk: np.ndarray, ids: dict[tuple[int, int], int]) -> np.ndarray:
    """A sequence id per (sequence, chunk) pair, 0, 1, ... in order of first appearance (`ids` carries on)."""
    pairs, first, inverse = np.unique(np.stack([seq, chunk], axis=1), axis=0, return_index=True,
                                      return_inverse=True)
    for i in np.argsort(first, kind="stable"):
        ids.setdefault((int(pairs[i, 0]), int(pairs[i, 1])), len(ids))
    lookup = np.array([ids[(int(a), int(b))] for a, b in pairs], dtype=np.int64)
    return lookup[inverse.ravel()]


def _jsonl_writer(params: LogsParams, out: Path, k: int, where: str, first_line: str) -> TraceWriter:
    """The writer for a jsonl log whose first row has k experts: num_layers (and num_experts
    unless set) are inferred from the rows."""
    if params.num_experts is not None and k > params.num_experts:
        raise TraceError(f"{where}: {first_line}: {k} experts per row, more than extract.logs.num_experts="
                         f"{params.num_experts}")
    meta = TraceMeta(num_layers=SHAPE_LIMIT, num_experts=params.num_experts or SHAPE_LIMIT, top_k=k,
                     source=params.model or "import:jsonl", source_params=source_params(params))
    infer = ("num_layers",) if params.num_experts is not None else ("num_layers", "num_experts")
    return TraceWriter(out, meta, where=where, infer=infer)
