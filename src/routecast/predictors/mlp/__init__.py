"""The `mlp` kind: the seed's MLP (its module: `routecast.predictors.mlp.model`).

Knobs (`<block>.mlp`): lr, layer_emb, expert_emb, architecture (hidden widths), dropout.
Search space (`tune.search_space.mlp`): the seed's ranges; a later hidden layer is at most as wide
as the one before. A new study starts from the seed's baseline and the seed's best configuration.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from routecast.config.fields import FloatRange, IntRange, check, validate_fields
from routecast.predictors.registry import Kind, register


@dataclass(frozen=True)
class MLPParams:
    lr: float = 0.000536
    layer_emb: int = 5
    expert_emb: int = 7
    architecture: list[int] = field(default_factory=lambda: [512, 512])
    dropout: float = 0.18

    def validate(self, key: str) -> None:
        check(self.lr > 0, f"{key}.lr", f"must be > 0, got {self.lr}")
        check(self.layer_emb >= 1, f"{key}.layer_emb", f"must be >= 1, got {self.layer_emb}")
        check(self.expert_emb >= 1, f"{key}.expert_emb", f"must be >= 1, got {self.expert_emb}")
        check(len(self.architecture) > 0, f"{key}.architecture", "must list at least one hidden width")
        for i, width in enumerate(self.architecture):
            check(width >= 1, f"{key}.architecture[{i}]", f"must be >= 1, got {width}")
        check(0.0 <= self.dropout < 1.0, f"{key}.dropout", f"must be in [0, 1), got {self.dropout}")


# The seed's two configurations: its baseline, and the best its search found.
SEED_BASELINE = MLPParams(lr=0.001, layer_emb=10, expert_emb=5, architecture=[256, 128, 64], dropout=0.2)
SEED_BEST = MLPParams()


@dataclass(frozen=True)
class UnitsRange:
    """Hidden widths: a later layer is drawn from [later.low, min(later.high, the width before)].

    So `later.low` must not exceed `first.low`: a first layer drawn below it would be followed by a
    wider one. (`later.high` above `first.high` is allowed: it is capped by the layer before.)
    """

    first: IntRange = field(default_factory=lambda: IntRange(128, 512, 64))
    later: IntRange = field(default_factory=lambda: IntRange(32, 512, 32))

    def validate(self, key: str) -> None:
        self.first.validate(f"{key}.first")
        self.later.validate(f"{key}.later")
        check(self.later.low <= self.first.low, f"{key}.later",
              f"low ({self.later.low}) must be <= first's low ({self.first.low}): a later layer is at most as wide "
              "as the one before, and a first layer drawn below it would be followed by a wider one")


@dataclass(frozen=True)
class MLPSpace:
    lr: FloatRange = field(default_factory=lambda: FloatRange(1e-4, 1e-2, log=True))
    layer_emb: IntRange = field(default_factory=lambda: IntRange(5, 20))
    expert_emb: IntRange = field(default_factory=lambda: IntRange(3, 10))
    n_layers: IntRange = field(default_factory=lambda: IntRange(2, 4))
    units: UnitsRange = field(default_factory=UnitsRange)
    dropout: FloatRange = field(default_factory=lambda: FloatRange(0.05, 0.4))

    def validate(self, key: str) -> None:
        validate_fields(self, key)
        check(0 <= self.dropout.low and self.dropout.high < 1, f"{key}.dropout", f"must lie in [0, 1), got "
              f"[{self.dropout.low}, {self.dropout.high}]")


def suggest(trial: Any, space: MLPSpace) -> MLPParams:
    lr = trial.suggest_float("lr", space.lr.low, space.lr.high, log=space.lr.log)
    dropout = trial.suggest_float("dropout", space.dropout.low, space.dropout.high, log=space.dropout.log)
    n_layers = trial.suggest_int("n_layers", space.n_layers.low, space.n_layers.high)
    first, later = space.units.first, space.units.later
    units = [trial.suggest_int("units_0", first.low, first.high, step=first.step)]
    for i in range(1, n_layers):  # each later layer is at most as wide as the one before
        units.append(trial.suggest_int(f"units_{i}", later.low, max(later.low, min(later.high, units[-1])),
                                       step=later.step))
    return MLPParams(lr=lr, dropout=dropout, architecture=units,
                     layer_emb=trial.suggest_int("layer_emb", space.layer_emb.low, space.layer_emb.high),
                     expert_emb=trial.suggest_int("expert_emb", space.expert_emb.low, space.expert_emb.high))


def trial_params(p: MLPParams) -> dict[str, Any]:
    return {"lr": p.lr, "dropout": p.dropout, "n_layers": len(p.architecture), "layer_emb": p.layer_emb,
            "expert_emb": p.expert_emb, **{f"units_{i}": u for i, u in enumerate(p.architecture)}}


def from_trial(t: dict[str, Any]) -> MLPParams:
    return MLPParams(lr=float(t["lr"]), dropout=float(t["dropout"]), layer_emb=int(t["layer_emb"]),
                     expert_emb=int(t["expert_emb"]),
                     architecture=[int(t[f"units_{i}"]) for i in range(int(t["n_layers"]))])


def inside(p: MLPParams, space: MLPSpace) -> bool:
    """Whether `suggest` can reach `p` (an enqueued trial outside the space would fail)."""
    first, later = space.units.first, space.units.later
    return (p.lr in space.lr and p.dropout in space.dropout and len(p.architecture) in space.n_layers
            and p.architecture[0] in first and all(u in later for u in p.architecture[1:])
            and p.layer_emb in space.layer_emb and p.expert_emb in space.expert_emb)


def starting_points(space: MLPSpace) -> list[tuple[str, MLPParams]]:
    return [(origin, p) for origin, p in (("baseline", SEED_BASELINE), ("seed_best", SEED_BEST)) if inside(p, space)]


def _model() -> Any:  # the kind's torch side, imported only when a model is fitted, loaded or served
    from routecast.predictors.mlp import model

    return model


KIND = register(Kind("mlp", MLPParams, MLPSpace, suggest, trial_params, from_trial, starting_points,
                     fit=lambda *args: _model().fit(*args), load=lambda config: _model().load(config),
                     serve=lambda module: _model().serve(module), reads_token=True, every_horizon=True))
