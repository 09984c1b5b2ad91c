"""What every log reader shares: the input files, the batch and line limits, the metadata of
the source, weight renormalisation, short values in error messages, and the closing report."""

from __future__ import annotations

import glob
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from routecast.config.params import LogsParams
from routecast.data.traces import TraceError

log = logging.getLogger(__name__)

CHUNK_ROWS = 1_000_000  # rows per TraceWriter.write batch (vllm_npy, parquet)
MAX_LINE_BYTES = 64 << 20  # a longer "line" means the file is not line-oriented text


def header_line(file: Path, encoding: str = "utf-8") -> str:
    """A CSV file's first line as text; a TraceError naming the file for an empty or non-text file."""
    with open(file, "rb") as fh:
        raw = fh.readline(MAX_LINE_BYTES)
    if not raw.strip():
        raise TraceError(f"{file}: empty file: no header line")
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError:
        raise TraceError(f"{file}: line 1: not UTF-8 text: is this a CSV file?") from None


def source_params(params: LogsParams, **extra: Any) -> dict[str, Any]:
    out = {k: v for k, v in asdict(params).items() if v is not None}
    if params.format != "jsonl":
        out.pop("fields", None)
    out.update(extra)
    return out


def input_files(path: str, suffixes: tuple[str, ...]) -> list[Path]:
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


def renormalize(weights: np.ndarray, where: str, origin: Any) -> np.ndarray:
    sums = weights.sum(axis=1, keepdims=True, dtype=np.float64)
    bad = ~(np.isfinite(sums[:, 0]) & (sums[:, 0] > 0))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise TraceError(f"{where}: {origin[row]}: weights {weights[row].tolist()} cannot be renormalised "
                         f"(sum {sums[row, 0]})")
    return (weights / sums).astype(np.float32)


def short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def log_report(path: Path | str, report: dict[str, Any]) -> None:
    log.info("%s: read %d rows (%d tokens); %d (token, layer) rows absent from the log (their samples are "
             "dropped by encode_features); %d rows re-sorted by weight", path, report["rows"], report["tokens"],
             report["missing_token_layer_rows"], report.get("rows_resorted_by_weight", 0))
