"""Training throughput of the tuned [512, 512] model (emb 5/7, 32 layers, batch 512) and the FLOP
rate it implies, as a share of this machine's dense fp32 matmul rate measured in the same run on
the model's own layer shapes.

FLOPs per training sample = 3 x forward, forward = 2 x sum(in_i x out_i) over the Linear layers
(239x512, 512x512, 512x8 for the tuned model: 777,216 forward, 2,331,648 per trained sample;
the backward pass is two matmuls per layer, grad-input and grad-weight). Embeddings, BatchNorm,
activations, dropout and the optimizer count zero: the ratio is the share of time spent in
useful matmul work. The matmul reference is torch.mm of [512 x in] @ [in x out] for each layer
shape, FLOP-weighted. Also timed, same data and threads: the seed's loop (out-of-place LeakyReLU,
unfused AdamW), the baseline [256, 128, 64] model and the GRU (hidden 256, its samples read a
token at a time). Rounds interleave all measurements; each figure is the best round.

    .venv/bin/python benchmarks/bench_train.py             # writes benchmarks/results/train_threads<N>.json
    ROUTECAST_NATIVE_ISA=1 .venv/bin/python benchmarks/bench_train.py   # ... train_threads<N>_native.json:
                                                           # torch's own CPU code paths, not pinned to AVX2
    .venv/bin/python benchmarks/bench_train.py --profile   # torch.profiler table of 30 steps
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import routecast  # noqa: E402,F401  -- before torch: the CPU code paths routecast trains with
from common import machine, write_result  # noqa: E402

# isort: split
import torch  # noqa: E402
from torch import nn  # noqa: E402

from routecast.config.params import FeaturesParams, ModelParams, SplitParams, SyntheticParams, TrainParams  # noqa: E402
from routecast.data.batches import sample_inputs  # noqa: E402
from routecast.data.features import encode_features  # noqa: E402
from routecast.data.split import split_features  # noqa: E402
from routecast.fit.training import fit_predictor, split_train_val  # noqa: E402
from routecast.predictors.mlp import SEED_BASELINE, SEED_BEST  # noqa: E402
from routecast.predictors.neural import ModelConfig, build_model, neural_config  # noqa: E402
from routecast.sources.synthetic import generate  # noqa: E402

TUNED = ModelParams("mlp", SEED_BEST)  # lr 5.36e-4, emb 5/7, [512, 512], dropout 0.18
BASELINE = ModelParams("mlp", SEED_BASELINE)  # lr 1e-3, emb 10/5, [256, 128, 64], dropout 0.2
GRU = ModelParams.of("gru", lr=3e-3, dropout=0.2, hidden=256, emb=32)


def mlp_config(params: ModelParams, feats) -> ModelConfig:
    """The `mlp` kind's module config for samples shaped like `feats` (what its `fit` builds)."""
    p = params.config
    return neural_config(params.kind, feats, layer_emb=p.layer_emb, expert_emb=p.expert_emb,
                         architecture=tuple(p.architecture), dropout=p.dropout)


def layer_shapes(config: ModelConfig) -> list[tuple[int, int]]:
    widths = [config.input_width, *config.architecture, config.num_experts]
    return list(zip(widths[:-1], widths[1:]))


def forward_flops(config: ModelConfig) -> int:
    return 2 * sum(i * o for i, o in layer_shapes(config))


def matmul_rate(shapes: list[tuple[int, int]], batch: int, seconds: float = 1.0) -> dict[str, float]:
    """FLOP-weighted dense fp32 torch.mm rate over the layer shapes ([batch x in] @ [in x out])."""
    per_shape, total_flops, total_time = {}, 0.0, 0.0
    for i, o in shapes:
        a, b = torch.randn(batch, i), torch.randn(i, o)
        for _ in range(5):
            torch.mm(a, b)
        reps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds * i * o / max(x * y for x, y in shapes):
            torch.mm(a, b)
            reps += 1
        elapsed = time.perf_counter() - start
        flops = 2.0 * batch * i * o * max(reps, 1)
        per_shape[f"{batch}x{i}@{i}x{o}"] = flops / elapsed / 1e9
        total_flops += flops
        total_time += elapsed
    return {"gflops": total_flops / total_time / 1e9, "per_shape_gflops": per_shape}


def seed_loop_rate(params: ModelParams, fit, batch: int, seed: int, steps: int) -> float:
    """samples/s of the seed's inner loop (out-of-place LeakyReLU, unfused AdamW on every parameter)."""
    torch.manual_seed(seed)
    model = build_model(mlp_config(params, fit))
    for m in model.mlp:
        if isinstance(m, nn.LeakyReLU):
            m.inplace = False
    optimizer = torch.optim.AdamW(model.parameters(), lr=params.config.lr, weight_decay=0.01)
    loss_fn = nn.CrossEntropyLoss()
    x, y = sample_inputs(fit), torch.from_numpy(fit.target.astype(np.int64))
    model.train()
    steps = min(steps, len(y) // batch)
    start = time.perf_counter()
    for s in range(steps):
        logits = model(*x.index(slice(s * batch, (s + 1) * batch)))
        loss = loss_fn(logits, y[s * batch: (s + 1) * batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return steps * batch / (time.perf_counter() - start)


def profile_steps(config: ModelConfig, fit, batch: int, steps: int = 30) -> None:
    """torch.profiler over `steps` training steps of the MLP."""
    from torch.profiler import profile

    torch.manual_seed(0)
    model = build_model(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=TUNED.config.lr, weight_decay=0.01, fused=True)
    x, y = sample_inputs(fit), torch.from_numpy(fit.target.astype(np.int64))

    def step(s: int) -> None:
        i = (s * batch) % (len(y) - batch)
        loss = nn.functional.cross_entropy(model(*x.index(slice(i, i + batch))), y[i: i + batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for s in range(5):
        step(s)
    with profile() as prof:
        for s in range(steps):
            step(s)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-sequences", type=int, default=64, help="synthetic sequences of 64 tokens")
    parser.add_argument("--threads", type=int, default=len(__import__("os").sched_getaffinity(0)))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--profile", action="store_true",
                        help="print a torch.profiler table (self CPU) of 30 training steps of the tuned model; "
                             "no timing")
    args = parser.parse_args()
    info = machine()
    torch.set_num_threads(args.threads)
    traces, _ = generate(SyntheticParams(num_sequences=args.num_sequences, tokens_per_sequence=64))
    train, _ = split_features(encode_features(traces, FeaturesParams()), SplitParams(test_fraction=0.05))
    fit, val = split_train_val(train)
    val = val.take(np.arange(min(len(val), 4096)))  # validation is not timed; keep it short
    train_params = TrainParams(epochs=1, batch_size=args.batch_size, threads=args.threads)
    config = mlp_config(TUNED, fit)
    flops_per_sample = 3 * forward_flops(config)
    shapes = layer_shapes(config)

    if args.profile:
        profile_steps(config, fit, args.batch_size)
        return

    rounds: list[dict[str, float]] = []
    for _ in range(args.rounds):
        row = {"matmul_gflops": matmul_rate(shapes, args.batch_size)["gflops"]}
        row["tuned_samples_per_second"] = fit_predictor(TUNED, train_params, fit, val, desc="bench").samples_per_second
        row["seed_loop_samples_per_second"] = seed_loop_rate(TUNED, fit, args.batch_size, 0, steps=150)
        row["baseline_samples_per_second"] = fit_predictor(BASELINE, train_params, fit, val,
                                                           desc="bench").samples_per_second
        row["gru_samples_per_second"] = fit_predictor(GRU, train_params, fit, val, desc="bench").samples_per_second
        row["matmul_gflops_after"] = matmul_rate(shapes, args.batch_size)["gflops"]
        rounds.append(row)
        print(row, flush=True)
    best = {key: max(r[key] for r in rounds) for key in rounds[0]}
    matmul = max(best["matmul_gflops"], best["matmul_gflops_after"])
    train_gflops = best["tuned_samples_per_second"] * flops_per_sample / 1e9
    native = "_native" if __import__("os").environ.get("ROUTECAST_NATIVE_ISA") == "1" else ""
    write_result(f"train_threads{args.threads}{native}", {
        "what": "fit_predictor, tuned [512, 512] (emb 5/7, 32 layers, batch 512), one epoch per round, fp32",
        "threads": args.threads,
        "fit_samples": len(fit),
        "layer_shapes": shapes,
        "flops_formula": "3 x 2 x sum(in x out) per sample (forward + grad-input + grad-weight matmuls)",
        "flops_per_sample": flops_per_sample,
        "samples_per_second": best["tuned_samples_per_second"],
        "train_gflops": train_gflops,
        "matmul_gflops": matmul,
        "matmul_per_shape_gflops": matmul_rate(shapes, args.batch_size)["per_shape_gflops"],
        "flop_ratio": train_gflops / matmul,
        "target_flop_ratio": 0.5,
        "seed_loop_samples_per_second": best["seed_loop_samples_per_second"],
        "speedup_vs_seed_loop": best["tuned_samples_per_second"] / best["seed_loop_samples_per_second"],
        "baseline_samples_per_second": best["baseline_samples_per_second"],
        "gru_samples_per_second": best["gru_samples_per_second"],
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "rounds": rounds,
        "machine": info,
    })


if __name__ == "__main__":
    main()
