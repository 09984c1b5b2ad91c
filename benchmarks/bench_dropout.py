"""Training-step time with routecast's SeededDropout against the first NumPy version of it
(`Generator.integers` int16 draws + `np.where`), same model, batch and process.

Both models are built from the same seed and trained on the same batch; rounds interleave them
and each figure is the best round. The ratio is the step-time speedup of the current masks.

    .venv/bin/python benchmarks/bench_dropout.py        # writes benchmarks/results/dropout.json
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_result  # noqa: E402

from routecast.model import Inputs, ModelConfig, RoutePredictor, SeededDropout

MODELS = {"tuned [512, 512], emb 5/7": ([512, 512], 5, 7), "baseline [256, 128, 64], emb 10/5": ([256, 128, 64], 10, 5)}
BATCH, ROUNDS, STEPS = 512, 6, 20


class IntegersDropout(nn.Dropout):
    """The previous SeededDropout: masks from Generator.integers and np.where."""

    def __init__(self, p: float) -> None:
        super().__init__(p)
        self._rng = np.random.Generator(np.random.SFC64(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        draws = self._rng.integers(-32768, 32768, size=x.shape, dtype=np.int16)
        threshold = round(self.p * 65536) - 32768
        return x * torch.from_numpy(np.where(draws >= threshold, np.float32(1.0 / (1.0 - self.p)), np.float32(0.0)))


def batch(rng: np.random.Generator) -> tuple[Inputs, torch.Tensor]:
    layer = torch.from_numpy(rng.integers(0, 32, BATCH))
    history = torch.where(torch.arange(32)[None] <= layer[:, None], torch.from_numpy(rng.integers(1, 9, (BATCH, 32))), 0)
    x = Inputs(layer, torch.from_numpy(rng.integers(1, 9, BATCH)), history,
               torch.from_numpy(rng.random((BATCH, 2), dtype=np.float32)),
               torch.from_numpy(rng.random(BATCH, dtype=np.float32)), torch.zeros(BATCH, 0))
    return x, torch.from_numpy(rng.integers(0, 8, BATCH))


def step_seconds(arch: list[int], layer_emb: int, expert_emb: int, threads: int) -> dict[str, float]:
    torch.set_num_threads(threads)
    x, y = batch(np.random.default_rng(0))
    models = {}
    for name in ("current", "previous"):
        torch.manual_seed(0)
        model = RoutePredictor(ModelConfig(32, 8, 2, 32, layer_emb, expert_emb, arch, 0.1))
        if name == "previous":
            for i, module in enumerate(model.mlp):
                if isinstance(module, SeededDropout):
                    model.mlp[i] = IntegersDropout(module.p)
        models[name] = (model, torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True))

    def step(name: str) -> None:
        model, optimizer = models[name]
        loss = F.cross_entropy(model(*x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    best = dict.fromkeys(models, float("inf"))
    for _ in range(ROUNDS):
        for name in models:
            for _ in range(3):
                step(name)
            start = time.perf_counter()
            for _ in range(STEPS):
                step(name)
            best[name] = min(best[name], (time.perf_counter() - start) / STEPS)
    return {"current_ms": best["current"] * 1e3, "previous_ms": best["previous"] * 1e3,
            "speedup": best["previous"] / best["current"]}


def main() -> None:
    info = machine()
    results = {f"{label}, {threads} thread(s)": step_seconds(*spec, threads)
               for label, spec in MODELS.items() for threads in (1, 2)}
    write_result("dropout", {"what": "training step (batch 512) with SeededDropout vs its previous "
                                     "Generator.integers + np.where masks, best of interleaved rounds",
                             "results": results, "machine": info})


if __name__ == "__main__":
    main()
