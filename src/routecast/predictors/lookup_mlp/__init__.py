"""The `lookup_mlp` kind: the seed's MLP on top of the three-deep lookup table, starting at the table
(its module: `routecast.predictors.lookup_mlp.model`).

Knobs and search space: the `mlp` kind's (`<block>.lookup_mlp`, `tune.search_space.lookup_mlp`).
A new study starts from the seed's best MLP configuration.
"""

from __future__ import annotations

from typing import Any

from routecast.predictors.mlp import SEED_BEST, MLPParams, MLPSpace, from_trial, inside, suggest, trial_params
from routecast.predictors.registry import Kind, register


def starting_points(space: MLPSpace) -> list[tuple[str, MLPParams]]:
    return [("lookup_mlp_default", SEED_BEST)] if inside(SEED_BEST, space) else []


def fit(params: MLPParams, *args: Any) -> Any:
    from routecast.predictors.lookup_mlp.model import fit_lookup_mlp

    return fit_lookup_mlp(params, *args)


def load(config: dict[str, Any]) -> Any:
    from routecast.predictors.lookup_mlp.model import LookupMLP
    from routecast.predictors.neural import ModelConfig

    return LookupMLP(ModelConfig(**{**config, "kind": "lookup_mlp"}))


KIND = register(Kind("lookup_mlp", MLPParams, MLPSpace, suggest, trial_params, from_trial, starting_points, fit, load,
                     describe="the MLP given the lookup table's log-probabilities, starting at the table"))
