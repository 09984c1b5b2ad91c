"""The `mixture` kind: a latent-type mixture of per-layer Markov chains fitted by EM (its module:
`routecast.predictors.mixture.model`; its fitting: `routecast.predictors.mixture.em`).

Knobs (`<block>.mixture`): num_types, smoothing, restarts, iterations.
Search space (`tune.search_space.mixture`): num_types, smoothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from routecast.config.fields import FloatRange, IntRange, check, validate_fields
from routecast.predictors.registry import Kind, register


@dataclass(frozen=True)
class MixtureParams:
    num_types: int = 32  # latent token types
    smoothing: float = 0.1  # pull of each type's tables towards the pooled ones (pseudo-count)
    restarts: int = 3  # EM runs from random starts; the best training likelihood wins
    iterations: int = 200  # EM iterations at most per run

    def validate(self, key: str) -> None:
        for name in ("num_types", "restarts", "iterations"):
            check(getattr(self, name) >= 1, f"{key}.{name}", f"must be >= 1, got {getattr(self, name)}")
        check(self.smoothing > 0, f"{key}.smoothing", f"must be > 0, got {self.smoothing}")


@dataclass(frozen=True)
class MixtureSpace:
    num_types: IntRange = field(default_factory=lambda: IntRange(8, 64))
    smoothing: FloatRange = field(default_factory=lambda: FloatRange(0.01, 3.0, log=True))

    def validate(self, key: str) -> None:
        validate_fields(self, key)
        check(self.smoothing.low > 0, f"{key}.smoothing.low", f"must be > 0, got {self.smoothing.low}")


def suggest(trial: Any, space: MixtureSpace) -> MixtureParams:
    return MixtureParams(
        num_types=trial.suggest_int("num_types", space.num_types.low, space.num_types.high, step=space.num_types.step),
        smoothing=trial.suggest_float("smoothing", space.smoothing.low, space.smoothing.high, log=space.smoothing.log))


def trial_params(p: MixtureParams) -> dict[str, Any]:
    return {"num_types": p.num_types, "smoothing": p.smoothing}


def from_trial(t: dict[str, Any]) -> MixtureParams:
    return MixtureParams(num_types=int(t["num_types"]), smoothing=float(t["smoothing"]))


def starting_points(space: MixtureSpace) -> list[tuple[str, MixtureParams]]:
    return [("mixture_default", MixtureParams(num_types=space.num_types.clip(32),
                                              smoothing=space.smoothing.clip(0.1)))]


def _em() -> Any:  # the kind's fitting (and, through it, its torch module), imported only when needed
    from routecast.predictors.mixture import em

    return em


KIND = register(Kind("mixture", MixtureParams, MixtureSpace, suggest, trial_params, from_trial, starting_points,
                     fit=lambda *args: _em().fit(*args), load=lambda config: _em().load(config), reads_token=True,
                     every_horizon=True))
