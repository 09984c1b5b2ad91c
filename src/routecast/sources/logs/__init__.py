"""Import existing routing logs into the canonical trace (`extract.source: import`).

`extract.logs.format` picks the reader: one module of this package per format, whose docstring
says what the format holds (its fields and warts):

    jsonl      long-format JSON lines, one per (sequence, token, layer), plain or gzip-compressed
    flame_csv  one dense `layer_L.csv` per MoE layer, one score column per expert (FLAME-MoE)
    vllm_npy   vLLM `routed_experts` arrays `[seq_len, num_layers, k]`, one per sequence
    deepseek_csv  DeepSeek-V2-Lite's `prompt_N_data.csv`, one per prompt: unordered expert sets, no weights
    parquet    a canonical trace (validated and rewritten)

`common` holds what the readers share.

Every reader streams: it reads, checks and writes the input a chunk at a time through
`TraceWriter`, so memory stays bounded whatever the log's size (each module says how much it
holds at once). The checks that need the whole input run in `TraceWriter` at the end (layers
contiguous 0..L-1, no repeated (sequence, token, layer) row, the expert count), and nothing is
written unless the whole input is valid. Errors name the file and line (or row, or array entry,
token and layer); every value is checked to fit its on-disk type before it is narrowed.

The shape (num_layers, num_experts, top_k) comes from the logs; `extract.logs.num_experts`
overrides the inferred expert count (largest id + 1), which undercounts when the highest
experts are never chosen. Missing (token, layer) rows are kept missing: `encode_features` drops
and counts the samples that need them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from routecast.config.params import LogsParams
from routecast.errors import InputError
from routecast.sources.logs.deepseek_csv import import_deepseek_csv
from routecast.sources.logs.flame_csv import import_flame_csv
from routecast.sources.logs.jsonl import import_jsonl
from routecast.sources.logs.parquet import import_parquet
from routecast.sources.logs.vllm_npy import import_vllm_npy

log = logging.getLogger(__name__)


def import_logs(params: LogsParams, out: str | Path) -> dict[str, Any]:
    """Write `out` (the canonical trace) from the logs `params.path`; return a report of counts."""
    if params.path is None:
        raise InputError("extract.logs.path: must be set to import logs")
    readers = {"jsonl": import_jsonl, "flame_csv": import_flame_csv, "vllm_npy": import_vllm_npy,
               "parquet": import_parquet, "deepseek_csv": import_deepseek_csv}
    report = readers[params.format](params, Path(out))
    log.info("imported %s (%s): %s", params.path, params.format,
             ", ".join(f"{k}={v}" for k, v in report.items()))
    return report
