"""encode_features at the seed's scale (170 sequences x 256 tokens x 32 layers = 1.39M trace rows,
1.35M samples): samples per second, against the plain per-row encoder on the same data.

The per-row reference takes minutes on the whole trace, so it runs on the first
--reference-sequences sequences (the same data, a prefix of it) and its per-sample rate is
extrapolated; the vectorised encoder is timed on that prefix too, so the ratio is like for like.

    .venv/bin/python benchmarks/bench_encode.py            # writes benchmarks/results/encode.json
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the per-row reference encoder
from common import best_of, machine, write_result  # noqa: E402
from reference_encoder import encode_features_reference  # noqa: E402
from routecast.config.params import FeaturesParams, SyntheticParams
from routecast.data.features import encode_features
from routecast.data.traces import Traces
from routecast.sources.synthetic import generate


def prefix(traces: Traces, num_sequences: int) -> Traces:
    rows = traces.seq_id < num_sequences
    return replace(traces, **{f.name: getattr(traces, f.name)[rows] for f in fields(traces)
                              if isinstance(getattr(traces, f.name), np.ndarray)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-sequences", type=int, default=170)
    parser.add_argument("--tokens-per-sequence", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--reference-sequences", type=int, default=24)
    args = parser.parse_args()
    info = machine()
    traces, _ = generate(SyntheticParams(num_sequences=args.num_sequences,
                                         tokens_per_sequence=args.tokens_per_sequence))
    params = FeaturesParams()
    n = len(encode_features(traces, params))
    best, times = best_of(lambda: encode_features(traces, params), args.repeats)

    # Missing rows and shuffled order take the general (sort + scatter) path: report it too.
    rng = np.random.default_rng(0)
    keep = rng.permutation(np.flatnonzero(rng.random(len(traces)) > 0.01))
    shuffled = replace(traces, **{f.name: getattr(traces, f.name)[keep] for f in fields(traces)
                                  if isinstance(getattr(traces, f.name), np.ndarray)})
    n_shuffled = len(encode_features(shuffled, params))
    best_shuffled, _ = best_of(lambda: encode_features(shuffled, params), max(3, args.repeats // 2))

    small = prefix(traces, args.reference_sequences)
    n_small = len(encode_features(small, params))
    best_small_fast, _ = best_of(lambda: encode_features(small, params), args.repeats)
    best_ref, _ = best_of(lambda: encode_features_reference(small, params), 2)
    rate = n / best
    rate_ref = n_small / best_ref
    write_result("encode", {
        "what": "encode_features on the seed's scale, synthetic trace (complete, in order)",
        "trace_rows": len(traces),
        "samples": n,
        "seconds_best": best,
        "seconds_all": times,
        "samples_per_second": rate,
        "target_samples_per_second": 3e6,
        "general_path": {"what": "same trace, 1% rows dropped, rows shuffled (sort + scatter path)",
                         "samples": n_shuffled, "seconds_best": best_shuffled,
                         "samples_per_second": n_shuffled / best_shuffled},
        "reference": {
            "what": f"encode_features_reference (per-row Python) on the first {args.reference_sequences} sequences "
                    f"({len(small)} rows, {n_small} samples); per-sample rate extrapolated to the whole trace",
            "seconds_best": best_ref,
            "samples_per_second": rate_ref,
            "vectorised_on_same_subset_samples_per_second": n_small / best_small_fast,
            "extrapolated_seconds_whole_trace": n / rate_ref,
        },
        "speedup_vs_reference": rate / rate_ref,
        "machine": info,
    })


if __name__ == "__main__":
    main()
