"""Latency of one predictor call (p50 / p99 / min, microseconds) for every kind, batches of 1 and
64 tokens, 1 and 2 threads: the kind's eager module on encoded inputs, the engine path
(`routecast.Predictor`: raw state in, top-k out) and its two exports (torch.export `.pt2`,
TorchScript `.ts`). Weights are random (latency does not depend on them); shapes are the
default trace's (32 layers, 8 experts, top-2) and each kind's default configuration.

Each call is timed alone (perf_counter around it) after a warm-up; inputs are prepared int64 /
float32 tensors, as an engine holds them.

    .venv/bin/python benchmarks/bench_predictor.py         # writes benchmarks/results/predictor.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import routecast  # noqa: E402,F401  -- before torch: the CPU code paths routecast trains with
from common import machine, write_result  # noqa: E402

# isort: split
import torch  # noqa: E402

from routecast.predictors.mixture.model import MixtureConfig, MixtureModule, MixtureTables  # noqa: E402
from routecast.predictors.neural import ModelConfig, build_model  # noqa: E402
from routecast.predictors.serve import Predictor  # noqa: E402

L, E, K, H = 32, 8, 2, 32


def models() -> dict[str, torch.nn.Module]:
    """Each kind at the configuration tune starts it from (the mixture at 32 types)."""
    torch.manual_seed(0)
    shape = dict(num_layers=L, num_experts=E, top_k=K, history_len=H)
    out = {
        "mlp": build_model(ModelConfig("mlp", **shape, layer_emb=5, expert_emb=7, architecture=(512, 512))),
        "baseline (mlp)": build_model(ModelConfig("mlp", **shape, layer_emb=10, expert_emb=5,
                                                  architecture=(256, 128, 64))),
        "lookup_mlp": build_model(ModelConfig("lookup_mlp", **shape, layer_emb=5, expert_emb=7,
                                              architecture=(512, 512))),
        "gru": build_model(ModelConfig("gru", **shape, expert_emb=32, hidden=128)),
    }
    out["mixture"] = random_mixture()
    return {name: m.eval() for name, m in out.items()}


def random_mixture(horizons: tuple[int, ...] = (), num_types: int = 32) -> MixtureModule:
    """A mixture of random tables (Dirichlet rows) at the benchmark's shape."""
    rng = np.random.default_rng(0)
    Z = num_types
    tables = MixtureTables(rng.dirichlet(np.ones(Z)), rng.dirichlet(np.ones(E), (Z,)),
                           rng.dirichlet(np.ones(E), (Z, L - 1, E)), rng.dirichlet(np.ones(E), (Z, L, E)),
                           prev=None, token=None, vocab=None, loglik=0.0)
    return MixtureModule(MixtureConfig(L, E, K, H, num_types=Z, horizons=horizons), tables)


def engine_inputs(n: int, rng: np.random.Generator) -> tuple[torch.Tensor, ...]:
    layer = torch.from_numpy(rng.integers(0, L - 1, n))
    history = torch.from_numpy(rng.integers(0, E, (n, H)))
    experts = torch.from_numpy(np.stack([rng.permutation(E)[:K] for _ in range(n)]))
    w = rng.uniform(0.5, 1.0, n).astype(np.float32)
    weights = torch.from_numpy(np.stack([w, 1 - w], 1))
    token_pos = torch.from_numpy(rng.integers(0, 4096, n).astype(np.float32))
    return (layer, history, experts, weights, token_pos, torch.zeros((n, 0)), torch.zeros((n, 0), dtype=torch.long),
            torch.full((n,), -1, dtype=torch.long))


def module_inputs(args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The same state as the kind module's inputs (+1 encodings, masked history, position)."""
    layer, history, experts, weights, token_pos, extra, prev, token = args
    hist = torch.where(torch.arange(H)[None] <= layer[:, None], history + 1, 0)
    return (layer, experts[:, 0], experts[:, 1] + 1, hist, weights, torch.clamp(token_pos / 2048.0, max=1.0), prev,
            extra, token)


def latencies(fn, seconds: float, min_calls: int = 200) -> dict[str, float]:
    for _ in range(30):
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="per measurement")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    args = parser.parse_args()
    info = machine()
    rng = np.random.default_rng(0)
    results: dict[str, object] = {}
    tmp = Path(tempfile.mkdtemp())
    for name, model in models().items():
        predictor = Predictor.from_model(model)
        slug = name.split()[0]
        ts = Predictor.load(predictor.export(tmp / f"{slug}.ts"))
        pt2 = Predictor.load(predictor.export(tmp / f"{slug}.pt2"))
        params = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
        variants = {
            "eager_module": lambda a, m, model=model: torch.softmax(model(*m), 1).topk(K),
            "engine_eager": lambda a, m, predictor=predictor: predictor.module.predict(*a, K),
            "torchscript": lambda a, m, ts=ts: ts.module.predict(*a, K),
            "torch_export_pt2": lambda a, m, pt2=pt2: pt2.module.predict(*a, K),
            "Predictor.predict(pt2)": lambda a, m, pt2=pt2: pt2.predict(*a[:5], k=K),
        }
        for threads in args.threads:
            torch.set_num_threads(threads)
            for n in args.batches:
                a = engine_inputs(n, rng)
                m = module_inputs(a)
                with torch.inference_mode():
                    row = {v: latencies(lambda fn=fn, a=a, m=m: fn(a, m), args.seconds) for v, fn in variants.items()}
                results[f"{name}/threads{threads}/batch{n}"] = {**row, "parameters": params}
                print(f"{name} threads={threads} batch={n}: " + ", ".join(
                    f"{v} p50 {r['p50_us']:.0f}" for v, r in row.items()), flush=True)
    write_result("predictor", {
        "what": "one predictor call per kind: top-2 next-layer experts + probabilities; random weights",
        "results": results,
        "machine": info,
    })


if __name__ == "__main__":
    main()
