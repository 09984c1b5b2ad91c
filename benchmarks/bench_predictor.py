"""Latency of one predictor call (p50 / p99 / min, microseconds) for batches of 1, 64 and 512
tokens at 1 and 2 threads: the eager training module vs the fused inference path
(routecast.Predictor) and its exports (TorchScript .ts, torch.export .pt2).

Each call is timed alone (perf_counter around it) after a warm-up; inputs are prepared int64 /
float32 tensors, as an engine holds them. `floor_us` is the time the call's matmul FLOPs take at
the dense fp32 matmul rate measured in the same run ([N x 512] @ [512 x 512] etc.): no fp32 path
can beat it, whatever its overhead.

    .venv/bin/python benchmarks/bench_predictor.py         # writes benchmarks/results/predictor.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_result  # noqa: E402

from routecast.features import FeatureMeta
from routecast.model import ModelConfig, RoutePredictor
from routecast.params import ModelParams
from routecast.predictor import Predictor

META = FeatureMeta(num_layers=32, num_experts=8, top_k=2, history_len=32, lookahead=1, position_scale=2048.0)
MODELS = {"tuned": ModelParams(0.000536, 5, 7, [512, 512], 0.18), "baseline": ModelParams(0.001, 10, 5, [256, 128, 64], 0.2)}


def inputs(n: int, rng: np.random.Generator) -> tuple[torch.Tensor, ...]:
    layer = torch.from_numpy(rng.integers(0, 31, n))
    history = torch.from_numpy(rng.integers(0, 8, (n, 32)))
    experts = torch.from_numpy(np.stack([rng.permutation(8)[:2] for _ in range(n)]))
    w = rng.uniform(0.5, 1.0, n).astype(np.float32)
    weights = torch.from_numpy(np.stack([w, 1 - w], 1))
    token_pos = torch.from_numpy(rng.integers(0, 4096, n).astype(np.float32))
    return layer, history, experts, weights, token_pos, torch.zeros((n, 0))


def eager_inputs(args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The same state as the training module's inputs (+1 encodings, masked history, position)."""
    layer, history, experts, weights, token_pos, extra = args
    hist = torch.where(torch.arange(32)[None] <= layer[:, None], history + 1, 0)
    return layer, experts[:, 1] + 1, hist, weights, torch.clamp(token_pos / 2048.0, max=1.0), extra


def latencies(fn, seconds: float, min_calls: int = 200) -> dict[str, float]:
    for _ in range(50):
        fn()
    times = []
    deadline = time.perf_counter() + seconds
    while len(times) < min_calls or time.perf_counter() < deadline:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    t = np.array(times) * 1e6
    return {"p50_us": float(np.percentile(t, 50)), "p99_us": float(np.percentile(t, 99)), "min_us": float(t.min()),
            "calls": len(t)}


def floor_us(config: ModelConfig, n: int) -> float:
    """Matmul time of the fused call's dense layers at the measured torch.mm rate (same threads)."""
    widths = [*config.architecture, config.num_experts]
    total = 0.0
    for i, o in zip(widths[:-1], widths[1:]):
        a, b = torch.randn(max(n, 1), i), torch.randn(i, o)
        best = min(latencies(lambda: torch.mm(a, b), 0.2)["min_us"] for _ in range(2))
        total += best
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="per measurement")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64, 512])
    args = parser.parse_args()
    info = machine()
    rng = np.random.default_rng(0)
    results: dict[str, object] = {}
    tmp = Path(tempfile.mkdtemp())
    for name, params in MODELS.items():
        torch.manual_seed(0)
        model = RoutePredictor(ModelConfig.build(META, params)).eval()
        fused = Predictor.from_model(model)
        ts = Predictor.load(fused.export(tmp / f"{name}.ts"))
        pt2 = Predictor.load(fused.export(tmp / f"{name}.pt2"))
        variants = {
            "eager_module": lambda a, e: torch.softmax(model(*e), 1).topk(2),
            "fused_eager": lambda a, e: fused.module.predict(*a, 2),
            "torchscript": lambda a, e: ts.module.predict(*a, 2),
            "torch_export_pt2": lambda a, e: pt2.module.predict(*a, 2),
            "Predictor.predict(torchscript)": lambda a, e: ts.predict(*a),
        }
        if name != "tuned":
            variants = {k: v for k, v in variants.items() if k in ("eager_module", "torchscript")}
        for threads in args.threads:
            torch.set_num_threads(threads)
            for n in args.batches:
                a = inputs(n, rng)
                e = eager_inputs(a)
                with torch.inference_mode():
                    row = {v: latencies(lambda fn=fn: fn(a, e), args.seconds) for v, fn in variants.items()}
                    row["floor_us"] = floor_us(model.config, n)
                results[f"{name}/threads{threads}/batch{n}"] = row
                print(f"{name} threads={threads} batch={n}: " + ", ".join(
                    f"{v} p50 {r['p50_us']:.0f}" for v, r in row.items() if isinstance(r, dict)) +
                    f", floor {row['floor_us']:.0f} us", flush=True)
    write_result("predictor", {
        "what": "one predictor call: top-2 next-layer experts + probabilities; random weights (latency only)",
        "target": "p50 <= 50 us for a batch of 64 (tuned model)",
        "results": results,
        "machine": info,
    })


if __name__ == "__main__":
    main()
