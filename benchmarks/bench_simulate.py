"""simulate_prefetch's replays at the default's coming scale (~2,500 test tokens x 32 layers, 12
predictors, the two plot sweeps): layer steps per second of the compiled loop against the same loop
run as plain Python, plus the JIT compile time.

A layer step is one (token, layer) of one replay: the layer's demand fetches, its wait, and the
prefetch for layer l + lookahead. The plain-Python loop (`simulate(..., compiled=False)`, the very
same code uninterpreted by numba) takes minutes on the whole workload, so it runs on the first
--reference-tokens tokens of a few replays, and the compiled loop is timed on that subset too.
The compile time is measured in a fresh process with an empty numba cache; the stage pays it once,
later runs load the compiled loop from `__pycache__`.

    .venv/bin/python benchmarks/bench_simulate.py      # writes benchmarks/results/simulate.json
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import best_of, machine, write_result  # noqa: E402
from routecast.config.params import SimulateParams, SyntheticParams
from routecast.data.traces import TraceMeta
from routecast.sim.prefetch import Engine, Replay, perfect_candidates, simulate, study
from routecast.sources.synthetic import generate

COMPILE_SNIPPET = """
import time, numpy as np
start = time.perf_counter()
from routecast.sim.prefetch import Engine, simulate
imported = time.perf_counter()
truth = np.zeros((2, 2, 2), np.int16); truth[..., 1] = 1
simulate(truth, None, Engine(2, 2, "lru", 1.0, 1.0, 1.0), num_experts=2)
print(imported - start, time.perf_counter() - imported)
"""


def make_replay(tokens: int, predictors: int, seed: int = 0) -> Replay:
    """The synthetic default's shape; predictors rank the true next-layer set first with probability 0.3 .. 0.9."""
    per_sequence = 256
    traces, _ = generate(SyntheticParams(num_sequences=-(-tokens // per_sequence), tokens_per_sequence=per_sequence))
    meta = traces.meta
    truth = traces.experts.reshape(-1, meta.num_layers, meta.top_k)[:tokens]  # rows are (sequence, token, layer)
    rng = np.random.default_rng(seed)
    target = perfect_candidates(truth, 1)
    rankings = {}
    for i, hit in enumerate(np.linspace(0.3, 0.9, predictors)):
        noise = np.argsort(rng.random(truth.shape[:2] + (meta.num_experts,)), axis=2).astype(np.int16)
        right = rng.random(truth.shape[:2]) < hit
        first = np.where(right[..., None], target, noise[..., : meta.top_k])
        # the other experts in the noise's order: those not in `first`, moved to the front (stable)
        keep = ~(noise[..., :, None] == first[..., None, :]).any(axis=3)
        order = np.argsort(~keep, axis=2, kind="stable")[..., : meta.num_experts - meta.top_k]
        rest = np.take_along_axis(noise, order, axis=2)
        grid = np.concatenate([first, rest], axis=2)
        grid[:, -1] = -1  # no prediction past the last layer
        rankings[f"p{i}"] = grid
    return Replay(truth=np.ascontiguousarray(truth), rankings=rankings, num_experts=meta.num_experts, lookahead=1,
                  sequences=-(-tokens // per_sequence), predicted_share=1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2560,
                        help="test tokens replayed (the default split will hold ~2,500)")
    parser.add_argument("--predictors", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reference-tokens", type=int, default=64)
    args = parser.parse_args()
    info = machine()
    sim = SimulateParams()  # the default preset and sweeps
    engine = Engine.from_params(sim, TraceMeta(num_layers=32, num_experts=8, top_k=2))
    predictor_ms = {"p0": 0.161}

    with tempfile.TemporaryDirectory() as cache:  # an empty numba cache: the compile a first stage run pays
        env = {**os.environ, "NUMBA_CACHE_DIR": cache}
        out = subprocess.run([sys.executable, "-c", COMPILE_SNIPPET], env=env, capture_output=True, text=True,
                             check=True).stdout.split()
        import_s, compile_s = float(out[0]), float(out[1])

    replay = make_replay(args.tokens, args.predictors)
    simulate(replay.truth[:2], None, engine, replay.num_experts)  # load or compile in this process
    done = study(replay, engine, predictor_ms)
    steps_per_replay = replay.tokens * replay.truth.shape[1]
    steps = done.replays * steps_per_replay
    best, times = best_of(lambda: study(replay, engine, predictor_ms), args.repeats)

    # Like for like on a prefix: the plain-Python loop and the compiled one, the same four replays.
    n = args.reference_tokens
    small = [(None, engine), (perfect_candidates(replay.truth[:n], 1), dataclasses.replace(engine, width=2)),
             (replay.rankings["p0"][:n], engine), (replay.rankings[f"p{args.predictors - 1}"][:n], engine)]

    def run_small(compiled: bool) -> None:
        for cand, eng in small:
            simulate(replay.truth[:n], cand, eng, replay.num_experts, compiled=compiled)

    small_steps = len(small) * n * replay.truth.shape[1]
    best_small, _ = best_of(lambda: run_small(True), max(args.repeats, 5))
    start = time.perf_counter()
    run_small(False)
    plain = time.perf_counter() - start
    write_result("simulate", {
        "what": "simulate_prefetch's study (every predictor + on_demand + perfect at the default engine, then the "
                "slots and width sweeps), synthetic default-shaped trace",
        "tokens": replay.tokens, "layers": replay.truth.shape[1], "predictors": args.predictors,
        "replays": done.replays, "layer_steps": steps,
        "seconds_best": best, "seconds_all": times,
        "layer_steps_per_second": steps / best,
        "target": "the default simulation under 30 s on 2 cores",
        "jit": {"what": "a fresh process, empty numba cache: import routecast.sim.prefetch, then the first call "
                        "(compile); later processes load the compiled loop from __pycache__",
                "import_seconds": import_s, "first_call_compile_seconds": compile_s},
        "reference": {
            "what": f"the same loop as plain Python (simulate(compiled=False)) on the first {n} tokens of "
                    f"{len(small)} replays; the compiled loop on the same subset",
            "layer_steps": small_steps,
            "plain_python_seconds": plain,
            "plain_python_layer_steps_per_second": small_steps / plain,
            "compiled_layer_steps_per_second_same_subset": small_steps / best_small,
            "plain_python_extrapolated_seconds_whole_study": steps / (small_steps / plain),
        },
        "speedup_vs_plain_python": (small_steps / best_small) / (small_steps / plain),
        "machine": info,
    })


if __name__ == "__main__":
    main()
