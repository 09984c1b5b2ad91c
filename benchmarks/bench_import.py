"""Importing a JSON-lines routing log of real size: rows per second and peak memory.

Generates a log in the Mixtral log's format (one line per (problem, layer, token), problems in
order, layer-major within a problem, as the patched vLLM recorded it: 32 layers, 8 experts,
top-2, `--tokens-per-sequence` decode tokens per problem) of about `--rows` rows (default 32M,
about 5 GB) into a temporary directory, then imports it (`extract.source: import`, format jsonl)
in a child process, which reports its time and its peak resident memory (getrusage max RSS).
The reference, in the same child right after the import: `pyarrow.json.read_json` (the parser
alone, default options) on the first `--reference-rows` rows of the same log.

    .venv/bin/python benchmarks/bench_import.py                 # writes benchmarks/results/import.json
    .venv/bin/python benchmarks/bench_import.py --rows 2000000  # a quick run

Target (issue 14): 32M rows at >= 1M rows/s and < 2 GiB peak.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_result  # noqa: E402

# One line of the log; each named field is written right-aligned in a fixed width (integers
# padded with spaces, which JSON allows before a value; gate weights as 0.dddddddd).
LINE = ['{"dataset": "humaneval", "problem_id": ', ("seq", 6), ', "layer": ', ("layer", 2), ', "experts": [',
        ("e1", 1), ", ", ("e2", 1), '], "gating_probs": [0.', ("p", 8), ", 0.", ("q", 8), '], "token_idx": ',
        ("tok", 7), "}\n"]
NUM_LAYERS, NUM_EXPERTS = 32, 8


def _layout() -> tuple[np.ndarray, dict[str, tuple[int, int]]]:
    """The line with its fields blank, and each field's (offset, width)."""
    text, where = "", {}
    for part in LINE:
        if isinstance(part, tuple):
            where[part[0]] = (len(text), part[1])
            text += " " * part[1]
        else:
            text += part
    return np.frombuffer(text.encode(), dtype=np.uint8), where


def _put(lines: np.ndarray, offset: int, width: int, values: np.ndarray, zeros: bool) -> None:
    """Write `values` as decimal digits into columns offset..offset+width of every line."""
    assert values.max(initial=0) < 10**width
    rest = values.astype(np.int64)
    for i in reversed(range(width)):
        digit = (rest % 10 + ord("0")).astype(np.uint8)
        if not zeros and i < width - 1:
            digit[rest == 0] = ord(" ")
        lines[:, offset + i] = digit
        rest //= 10


def generate_log(path: Path, sequences: int, tokens: int, seed: int = 0, chunk: int = 1 << 18) -> int:
    """Write the log (vectorised: a [rows, line width] byte matrix per chunk); return its rows."""
    template, where = _layout()
    rng = np.random.default_rng(seed)
    rows = sequences * NUM_LAYERS * tokens
    with open(path, "wb") as fh:
        for start in range(0, rows, chunk):
            r = np.arange(start, min(start + chunk, rows), dtype=np.int64)
            lines = np.broadcast_to(template, (len(r), len(template))).copy()
            e1 = rng.integers(0, NUM_EXPERTS, len(r))
            p = rng.integers(50_000_000, 100_000_000, len(r))  # the primary's weight >= 0.5
            fields = {"seq": r // (NUM_LAYERS * tokens), "layer": r // tokens % NUM_LAYERS, "tok": r % tokens,
                      "e1": e1, "e2": (e1 + rng.integers(1, NUM_EXPERTS, len(r))) % NUM_EXPERTS,
                      "p": p, "q": 100_000_000 - p}
            for name, values in fields.items():
                _put(lines, *where[name], values, zeros=name in ("p", "q"))
            lines.tofile(fh)
    return rows


CHILD = """
import json, resource, sys, time
log, out, reference_rows = sys.argv[1], sys.argv[2], int(sys.argv[3])
from routecast.sources.logs import import_logs
from routecast.config.params import LogsParams
start = time.perf_counter()
report = import_logs(LogsParams(path=log, model="bench"), out)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # before the reference runs
import io, pyarrow.json as pajson
with open(log, "rb") as fh:
    head = b"".join(fh.readline() for _ in range(reference_rows))
start = time.perf_counter()
table = pajson.read_json(io.BytesIO(head))
reference_seconds = time.perf_counter() - start
print(json.dumps({"report": report, "seconds": seconds, "peak_rss_bytes": peak,
                  "reference_rows": table.num_rows, "reference_seconds": reference_seconds}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=32_000_000, help="about this many rows (whole sequences)")
    parser.add_argument("--tokens-per-sequence", type=int, default=1100)
    parser.add_argument("--reference-rows", type=int, default=1_000_000)
    parser.add_argument("--tmpdir", default=None, help="where the log and the trace go (default: the system's)")
    parser.add_argument("--name", default="import", help="results file benchmarks/results/<name>.json")
    args = parser.parse_args()
    info = machine()
    sequences = max(1, round(args.rows / (NUM_LAYERS * args.tokens_per_sequence)))
    with tempfile.TemporaryDirectory(dir=args.tmpdir, prefix="bench_import.") as tmp:
        log = Path(tmp) / "routing.jsonl"
        start = time.perf_counter()
        rows = generate_log(log, sequences, args.tokens_per_sequence)
        generate_seconds = time.perf_counter() - start
        print(f"generated {rows:,} rows ({log.stat().st_size / 2**30:.2f} GiB) in {generate_seconds:.1f}s",
              file=sys.stderr)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"),
                                                             os.environ.get("PYTHONPATH", "")])}
        child = subprocess.run([sys.executable, "-c", CHILD, str(log), str(Path(tmp) / "traces.parquet"),
                                str(min(args.reference_rows, rows))],
                               env=env, check=True, stdout=subprocess.PIPE, text=True)
        got = json.loads(child.stdout.strip().splitlines()[-1])
        trace_bytes = (Path(tmp) / "traces.parquet").stat().st_size
        log_bytes = log.stat().st_size
    assert got["report"]["rows"] == rows, got["report"]
    rate = rows / got["seconds"]
    reference_rate = got["reference_rows"] / got["reference_seconds"]
    write_result(args.name, {
        "what": "import_logs, format jsonl: a generated log in the Mixtral log's format, imported in a child process",
        "rows": rows,
        "sequences": sequences,
        "tokens_per_sequence": args.tokens_per_sequence,
        "log_bytes": log_bytes,
        "trace_bytes": trace_bytes,
        "generate_seconds": generate_seconds,
        "seconds": got["seconds"],
        "rows_per_second": rate,
        "peak_rss_bytes": got["peak_rss_bytes"],
        "peak_rss_gib": got["peak_rss_bytes"] / 2**30,
        "target": {"rows_per_second": 1e6, "peak_rss_gib_below": 2.0, "at_rows": 32_000_000},
        "reference": {
            "what": f"pyarrow.json.read_json (default options, the parser alone) on the log's first "
                    f"{got['reference_rows']:,} rows, in the same child process after the import",
            "seconds": got["reference_seconds"],
            "rows_per_second": reference_rate,
        },
        "import_vs_reference": rate / reference_rate,
        "report": got["report"],
        "machine": info,
    })


if __name__ == "__main__":
    main()
