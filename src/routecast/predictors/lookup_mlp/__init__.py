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


def _model() -> Any:  # the kind's torch side, imported only when a model is fitted, loaded or served
    from routecast.predictors.lookup_mlp import model

    return model


KIND = register(Kind("lookup_mlp", MLPParams, MLPSpace, suggest, trial_params, from_trial, starting_points,
                     fit=lambda *args: _model().fit(*args), load=lambda config: _model().load(config),
                     reads_token=True, every_horizon=True))
