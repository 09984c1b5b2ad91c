"""Training-step time of the MLP with torch's own `nn.Dropout` (what routecast trains with: device-
agnostic, no NumPy in the step) against the NumPy-mask dropout routecast used before (16-bit lanes
of raw SFC64 words compared in NumPy, the fastest CPU masks it had measured), same model, batch and
process. Rounds interleave the two; each figure is the best round.

    .venv/bin/python benchmarks/bench_dropout.py        # writes benchmarks/results/dropout.json
"""

from __future__ import annotations

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
from torch.nn import functional as F  # noqa: E402

from routecast.predictors.neural import ModelConfig, build_model  # noqa: E402

MODELS = {"tuned [512, 512], emb 5/7": ((512, 512), 5, 7), "baseline [256, 128, 64], emb 10/5": ((256, 128, 64), 10, 5)}
BATCH, ROUNDS, STEPS = 512, 6, 20


class NumpyMaskDropout(nn.Dropout):
    """The previous dropout: masks from 16-bit lanes of a NumPy SFC64 stream's raw words."""

    def __init__(self, p: float) -> None:
        super().__init__(p)
        self._bits = np.random.SFC64(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        n = x.numel()
        draws = self._bits.random_raw(-(-n // 4)).view(np.int16)[:n]
        mask = np.greater_equal(draws.reshape(x.shape), round(self.p * 65536) - 32768).astype(np.float32)
        mask *= np.float32(1.0 / (1.0 - self.p))
        return x * torch.from_numpy(mask)


def batch(rng: np.random.Generator) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    layer = torch.from_numpy(rng.integers(0, 31, BATCH))
    history = torch.where(torch.arange(32)[None] <= layer[:, None],
                          torch.from_numpy(rng.integers(1, 9, (BATCH, 32))), 0)
    x = (layer, torch.from_numpy(rng.integers(0, 8, BATCH)), torch.from_numpy(rng.integers(1, 9, BATCH)), history,
         torch.from_numpy(rng.random((BATCH, 2), dtype=np.float32)),
         torch.from_numpy(rng.random(BATCH, dtype=np.float32)),
         torch.zeros(BATCH, 0, dtype=torch.long), torch.zeros(BATCH, 0))
    return x, torch.from_numpy(rng.integers(0, 8, BATCH))


def step_seconds(arch: tuple[int, ...], layer_emb: int, expert_emb: int, threads: int) -> dict[str, float]:
    torch.set_num_threads(threads)
    x, y = batch(np.random.default_rng(0))
    models = {}
    for name in ("nn.Dropout", "numpy_masks"):
        torch.manual_seed(0)
        model = build_model(ModelConfig("mlp", 32, 8, 2, 32, layer_emb=layer_emb, expert_emb=expert_emb,
                                        architecture=arch, dropout=0.1))
        if name == "numpy_masks":
            for i, module in enumerate(model.mlp):
                if isinstance(module, nn.Dropout):
                    model.mlp[i] = NumpyMaskDropout(module.p)
        models[name] = (model.train(), torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True))
    best = {name: float("inf") for name in models}
    for _ in range(ROUNDS):
        for name, (model, opt) in models.items():
            start = time.perf_counter()
            for _ in range(STEPS):
                loss = F.cross_entropy(model(*x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            best[name] = min(best[name], (time.perf_counter() - start) / STEPS)
    return best


def main() -> None:
    info = machine()
    results = {}
    for label, (arch, le, ee) in MODELS.items():
        for threads in (1, 2):
            t = step_seconds(arch, le, ee, threads)
            results[f"{label}, {threads} threads"] = {
                "nn_dropout_ms": t["nn.Dropout"] * 1e3, "numpy_masks_ms": t["numpy_masks"] * 1e3,
                "nn_dropout_vs_numpy_masks": t["nn.Dropout"] / t["numpy_masks"]}
            print(label, threads, results[f"{label}, {threads} threads"], flush=True)
    write_result("dropout", {"what": f"one training step (batch {BATCH}, best of {ROUNDS} rounds of {STEPS} steps): "
                                     "nn.Dropout time / NumPy-mask dropout time (> 1: nn.Dropout slower)",
                             "results": results, "machine": info})


if __name__ == "__main__":
    main()
