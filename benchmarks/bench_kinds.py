"""Every predictor kind on the default synthetic trace: accuracy and cost, side by side.

Per kind, trained for the next primary and for the next top-k set (`train.target`): test top-2,
set recall and exact set (from `routecast.evaluate.evaluation`), the ratio to the exact oracle's top-2,
training samples/s, parameters, and the engine call's p50 latency for 64 tokens (1 thread,
`routecast.Predictor`, eager). Then what limits the neural kinds: the GRU (and the mixture beside
it) retrained on 2x and 4x the default's sequences, same test split size, same oracle.

Each kind runs at one fixed, sensible configuration (below), not tune's pick, so the table
compares kinds rather than search luck; `dvc repro` reports what tune picks.

    .venv/bin/python benchmarks/bench_kinds.py                 # writes benchmarks/results/kinds.json
    .venv/bin/python benchmarks/bench_kinds.py --scales 1      # without the data-scaling runs
    .venv/bin/python benchmarks/bench_kinds.py --steps-control 4   # the GRU on the default data, 4 x the epochs
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import routecast  # noqa: E402,F401  -- before torch: the CPU code paths routecast trains with
from common import machine, write_result  # noqa: E402

# isort: split
import torch  # noqa: E402

from bench_predictor import latencies  # noqa: E402
from routecast.config.params import ModelParams, load_params  # noqa: E402
from routecast.data.features import encode_features  # noqa: E402
from routecast.data.split import split_features  # noqa: E402
from routecast.evaluate.evaluation import ModelScorer, score_metrics  # noqa: E402
from routecast.fit.training import fit_predictor, split_train_val  # noqa: E402
from routecast.predictors.mlp import SEED_BEST  # noqa: E402
from routecast.predictors.oracle import OraclePredictor  # noqa: E402
from routecast.predictors.serve import Predictor  # noqa: E402
from routecast.sources.synthetic import generate  # noqa: E402

CONFIGS = {  # SEED_BEST: the seed's best MLP (lr 5.36e-4, emb 5/7, [512, 512], dropout 0.18)
    "mlp": ModelParams("mlp", SEED_BEST),
    "lookup_mlp": ModelParams("lookup_mlp", SEED_BEST),
    "gru": ModelParams.of("gru", lr=3e-3, dropout=0.2, hidden=256, emb=32),
    "mixture": ModelParams.of("mixture", num_types=48, smoothing=0.5),
}


def engine_p50_us(model: torch.nn.Module, test, n: int = 64) -> float:
    predictor = Predictor.from_model(model)
    batch = test.take(np.arange(n))
    torch.set_num_threads(1)
    with torch.inference_mode():
        return latencies(lambda: predictor.predict_features(batch), 1.0)["p50_us"]


def split(params, num_sequences: int, test_sequences: int):
    """The default trace at `num_sequences`; the test split always holds `test_sequences` sequences."""
    synthetic = dataclasses.replace(params.extract.synthetic, num_sequences=num_sequences)
    traces, _ = generate(synthetic)
    split_params = dataclasses.replace(params.split, test_fraction=test_sequences / num_sequences)
    train, test = split_features(encode_features(traces, params.features), split_params)
    return traces, *split_train_val(train), test


EPOCHS = 20


def run(kind: str, target: str, params, fit, val, test, oracle_top2: float, latency: bool,
        epochs: int = EPOCHS) -> dict[str, object]:
    train = dataclasses.replace(params.train, target=target, epochs=epochs)
    start = time.perf_counter()
    result = fit_predictor(CONFIGS[kind], train, fit, val, desc=f"{kind} ({target})")
    seconds = time.perf_counter() - start
    scores = ModelScorer(kind, result.model).scores(test)
    row = {**score_metrics(scores, test), "top2_vs_oracle": score_metrics(scores, test)["top2"] / oracle_top2,
           "samples_per_second": result.samples_per_second, "fit_seconds": seconds, "best_epoch": result.best_epoch,
           "parameters": sum(p.numel() for p in result.model.parameters()) +
           sum(b.numel() for b in result.model.buffers())}
    if latency:
        row["engine_p50_us_batch64_1thread"] = engine_p50_us(result.model, test)
    print(f"{kind:10s} {target:7s} {epochs} epochs: top-2 {row['top2']:.4f} "
          f"({row['top2_vs_oracle']:.3f} of the oracle), "
          f"set recall {row['set_recall']:.4f}, {row['samples_per_second']:.0f} samples/s", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 2, 4], help="multiples of the default data")
    parser.add_argument("--steps-control", type=int, metavar="N",
                        help="only the GRU on the default data for N x the epochs (as many steps as on N x the "
                             "data), added to an existing kinds.json: is it data or optimisation steps?")
    args = parser.parse_args()
    params = load_params(ROOT / "params.yaml")
    threads = params.train.threads
    base = params.extract.synthetic.num_sequences
    test_sequences = max(1, round(base * params.split.test_fraction))
    if args.steps_control:
        steps_control(args.steps_control, params, base, test_sequences, threads)
        return
    out: dict[str, object] = {"machine": machine(), "configs": {k: v.to_plain() for k, v in CONFIGS.items()},
                              "train_threads": threads, "kinds": {}, "scaling": {}}
    for scale in args.scales:
        traces, fit, val, test = split(params, base * scale, test_sequences)
        oracle = score_metrics(OraclePredictor.from_trace_meta(traces.meta).scores(test), test)
        entry = {"sequences": base * scale, "fit_samples": len(fit), "test_samples": len(test), "oracle": oracle}
        if scale == 1:
            for kind in CONFIGS:
                torch.set_num_threads(threads or 1)
                out["kinds"][kind] = {t: run(kind, t, params, fit, val, test, oracle["top2"], latency=t == "primary")
                                      for t in ("primary", "set")}
            out["kinds"]["oracle"] = oracle
        else:
            for kind in ("gru", "mixture"):
                torch.set_num_threads(threads or 1)
                entry[kind] = run(kind, "primary", params, fit, val, test, oracle["top2"], latency=False)
        out["scaling"][scale] = entry
    if 1 in args.scales:
        out["scaling"][1].update({k: out["kinds"][k]["primary"] for k in ("gru", "mixture")})
    write_result("kinds", out)


def steps_control(factor: int, params, base: int, test_sequences: int, threads: int | None) -> None:
    path = HERE / "results" / "kinds.json"
    out = json.loads(path.read_text())
    info = machine()
    traces, fit, val, test = split(params, base, test_sequences)
    oracle = score_metrics(OraclePredictor.from_trace_meta(traces.meta).scores(test), test)
    torch.set_num_threads(threads or 1)
    row = run("gru", "primary", params, fit, val, test, oracle["top2"], latency=False, epochs=EPOCHS * factor)
    out["steps_control"] = {"what": f"the GRU on the default data for {factor} x {EPOCHS} epochs (early stopping "
                                    f"patience {params.train.early_stopping_patience}): as many steps as "
                                    f"{EPOCHS} epochs on {factor} x the data", "epochs": EPOCHS * factor,
                            "gru": row, "machine": {**info, "load_after": os.getloadavg()[0]},
                            "command": f"python benchmarks/bench_kinds.py --steps-control {factor}"}
    path.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
