"""Weight decay on the weight matrices only (nanoGPT's configure_optimizers, what routecast does)
against weight decay on every parameter (embeddings, BatchNorm and biases too, as the seed did):
best validation top-2 of the baseline and the seed's best MLP on the default data, same seeds, in
one process. routecast keeps the groups only if they are not worse.

    .venv/bin/python benchmarks/ablation_weight_decay.py   # writes benchmarks/results/weight_decay.json
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import routecast  # noqa: E402,F401  -- before torch: the CPU code paths routecast trains with
from common import machine, write_result  # noqa: E402

# isort: split
import torch  # noqa: E402

from routecast.config.params import ModelParams, load_params  # noqa: E402
from routecast.data.features import encode_features  # noqa: E402
from routecast.data.split import split_features  # noqa: E402
from routecast.fit import training  # noqa: E402
from routecast.predictors.mlp import SEED_BEST  # noqa: E402
from routecast.sources.synthetic import generate  # noqa: E402

ROOT = HERE.parent


def decay_everything(model: torch.nn.Module, lr: float, weight_decay: float, device: torch.device):
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=True)


def main() -> None:
    params = load_params(ROOT / "params.yaml")
    traces, _ = generate(params.extract.synthetic)
    train, _ = split_features(encode_features(traces, params.features), params.split)
    fit, val = training.split_train_val(train)

    grouped = training.configure_optimizer
    results = {}
    for name, model in (("baseline", params.baseline), ("seed_best", ModelParams("mlp", SEED_BEST))):
        for variant, optimizer in (("matrices_only", grouped), ("every_parameter", decay_everything)):
            training.configure_optimizer = optimizer
            result = training.fit_predictor(model, params.train, fit, val, desc=f"{name} {variant}")
            results.setdefault(name, {})[variant] = {"best_val_top2": result.best_value,
                                                     "best_epoch": result.best_epoch}
            print(name, variant, round(result.best_value, 4), flush=True)
        training.configure_optimizer = grouped
        results[name]["delta"] = results[name]["matrices_only"]["best_val_top2"] - \
            results[name]["every_parameter"]["best_val_top2"]
    write_result("weight_decay", {"what": "best validation top-2, default data, train params of params.yaml",
                                  "weight_decay": params.train.weight_decay, "results": results, "machine": machine()})


if __name__ == "__main__":
    main()
