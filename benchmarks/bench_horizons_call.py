"""Latency of the engine's every-horizon call (`Predictor.predict_horizons`: the top-2 at layers
l + 1, 2, 4 and 8 and the next token's at layer l, from one call per layer) against the same model's first-horizon call
(`predict`), in the same process: p50 / p99 / min microseconds, batch 1 and 64, 1 thread, eager
engine and TorchScript. Weights are random (latency does not depend on them); shapes are the
default trace's (32 layers, 8 experts, top-2), each kind at its default configuration with one
head per target (the mixture: 32 types, a table per target).

    .venv/bin/python benchmarks/bench_horizons_call.py     # writes benchmarks/results/horizons_call.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import routecast  # noqa: E402,F401  -- before torch: the CPU code paths routecast trains with
from bench_predictor import E, H, K, L, engine_inputs, latencies, random_mixture  # noqa: E402
from common import machine, write_result  # noqa: E402

# isort: split
import torch  # noqa: E402

from routecast.config.params import NEXT_TOKEN  # noqa: E402
from routecast.predictors.neural import ModelConfig, build_model  # noqa: E402
from routecast.predictors.serve import Predictor  # noqa: E402

HORIZONS = (1, 2, 4, 8, NEXT_TOKEN)  # features.horizons [1, 2, 4, 8] and features.next_token


def models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    shape = dict(num_layers=L, num_experts=E, top_k=K, history_len=H, horizons=HORIZONS)
    out = {
        "baseline mlp [32, 16]": build_model(ModelConfig("mlp", **shape, layer_emb=3, expert_emb=4,
                                                         architecture=(32, 16))),
        "seed mlp [512, 512]": build_model(ModelConfig("mlp", **shape, layer_emb=5, expert_emb=7,
                                                       architecture=(512, 512))),
        "gru": build_model(ModelConfig("gru", **shape, expert_emb=32, hidden=128)),
    }
    out["mixture"] = random_mixture(HORIZONS)
    return {name: m.eval() for name, m in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="per measurement")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    args = parser.parse_args()
    info = machine()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    tmp = Path(tempfile.mkdtemp())
    results: dict[str, object] = {}
    for name, model in models().items():
        predictor = Predictor.from_model(model)
        ts = Predictor.load(predictor.export(tmp / f"{name.split()[0]}.ts"))
        variants = {
            "engine_eager/predict": lambda a, p=predictor: p.module.predict(*a, K),
            "engine_eager/predict_horizons": lambda a, p=predictor: p.module.predict_horizons(*a, K),
            "torchscript/predict": lambda a, p=ts: p.module.predict(*a, K),
            "torchscript/predict_horizons": lambda a, p=ts: p.module.predict_horizons(*a, K),
        }
        for n in args.batches:
            a = engine_inputs(n, rng)
            with torch.inference_mode():
                row = {v: latencies(lambda fn=fn, a=a: fn(a), args.seconds) for v, fn in variants.items()}
            ratio = row["torchscript/predict_horizons"]["p50_us"] / row["torchscript/predict"]["p50_us"]
            results[f"{name}/batch{n}"] = {**row, "horizons_over_one_p50_torchscript": ratio}
            print(f"{name} batch={n}: " + ", ".join(f"{v} p50 {r['p50_us']:.0f}" for v, r in row.items()), flush=True)
    write_result("horizons_call", {
        "what": "one engine call per layer: top-2 at every horizon (1, 2, 4, 8) and for the next token vs the "
                "first horizon only; random weights, 1 thread",
        "results": results,
        "machine": info,
    })


if __name__ == "__main__":
    main()
