"""`parquet`: a canonical trace, validated and rewritten.

Streamed a batch at a time: memory holds one batch (CHUNK_ROWS rows).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from routecast.config.params import LogsParams
from routecast.data.traces import RowNames, TraceError, TraceWriter, iter_traces, read_trace_meta
from routecast.sources.logs.common import CHUNK_ROWS, log_report


def import_parquet(params: LogsParams, out: Path) -> dict[str, Any]:
    """A canonical trace file: validated batch by batch and rewritten (the metadata records the origin)."""
    import pyarrow.parquet as pq

    path = Path(params.path)
    if not path.is_file():
        raise TraceError(f"extract.logs.path: {path}: no such file (the parquet format reads one trace file)")
    m = read_trace_meta(path)
    if params.num_experts is not None and params.num_experts != m.num_experts:
        raise TraceError(f"{path}: its metadata says num_experts={m.num_experts}, "
                         f"extract.logs.num_experts is {params.num_experts}")
    meta = replace(m, source=params.model or m.source, source_params={**m.source_params, "imported_from": str(path)})
    names = pq.read_schema(path).names
    with TraceWriter(out, meta, "token_id" in names, "spec_logits" in names, where=str(path)) as writer:
        for first, t in tqdm(iter_traces(path, CHUNK_ROWS), desc="import parquet", unit="batch"):
            writer.write(t.seq_id, t.token_pos, t.layer, t.experts, t.weights, t.token_id, t.spec_logits,
                         origin=RowNames("row", first))
        stats = writer.finish()
    report = {"rows": stats["rows"], "tokens": stats["tokens"],
              "missing_token_layer_rows": stats["tokens"] * m.num_layers - stats["rows"]}
    log_report(path, report)
    return report
