"""The `gru` kind: a GRU over the token's path through the layers, one head per layer (its module:
`routecast.predictors.gru.model`).

Knobs (`<block>.gru`): lr, dropout, hidden (state width), emb (width of the (layer, expert)
embeddings), layers (stacked GRU layers), batch_tokens (tokens per training batch).
Search space (`tune.search_space.gru`): lr, dropout, hidden, emb.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from routecast.config.fields import FloatRange, IntRange, check, validate_fields
from routecast.predictors.registry import Kind, register


@dataclass(frozen=True)
class GRUParams:
    lr: float = 0.003
    dropout: float = 0.2
    hidden: int = 256  # GRU state width
    emb: int = 32  # width of the (layer, expert) embeddings it reads
    layers: int = 1  # stacked GRU layers
    batch_tokens: int = 128  # tokens per training batch (each is up to num_layers - lookahead samples)

    def validate(self, key: str) -> None:
        check(self.lr > 0, f"{key}.lr", f"must be > 0, got {self.lr}")
        check(0.0 <= self.dropout < 1.0, f"{key}.dropout", f"must be in [0, 1), got {self.dropout}")
        for name in ("hidden", "emb", "layers", "batch_tokens"):
            check(getattr(self, name) >= 1, f"{key}.{name}", f"must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class GRUSpace:
    lr: FloatRange = field(default_factory=lambda: FloatRange(1e-4, 1e-2, log=True))
    dropout: FloatRange = field(default_factory=lambda: FloatRange(0.05, 0.4))
    hidden: IntRange = field(default_factory=lambda: IntRange(64, 256, 64))
    emb: IntRange = field(default_factory=lambda: IntRange(16, 64, 16))

    def validate(self, key: str) -> None:
        validate_fields(self, key)
        check(0 <= self.dropout.low and self.dropout.high < 1, f"{key}.dropout", f"must lie in [0, 1), got "
              f"[{self.dropout.low}, {self.dropout.high}]")


def suggest(trial: Any, space: GRUSpace) -> GRUParams:
    return GRUParams(lr=trial.suggest_float("lr", space.lr.low, space.lr.high, log=space.lr.log),
                     dropout=trial.suggest_float("dropout", space.dropout.low, space.dropout.high,
                                                 log=space.dropout.log),
                     hidden=trial.suggest_int("hidden", space.hidden.low, space.hidden.high, step=space.hidden.step),
                     emb=trial.suggest_int("gru_emb", space.emb.low, space.emb.high, step=space.emb.step))


def trial_params(p: GRUParams) -> dict[str, Any]:
    return {"lr": p.lr, "dropout": p.dropout, "hidden": p.hidden, "gru_emb": p.emb}


def from_trial(t: dict[str, Any]) -> GRUParams:
    return GRUParams(lr=float(t["lr"]), dropout=float(t["dropout"]), hidden=int(t["hidden"]), emb=int(t["gru_emb"]))


def starting_points(space: GRUSpace) -> list[tuple[str, GRUParams]]:
    return [("gru_default", GRUParams(lr=space.lr.clip(3e-3), dropout=space.dropout.clip(0.3),
                                      hidden=space.hidden.clip(128), emb=space.emb.clip(32)))]


def _model() -> Any:  # the kind's torch side, imported only when a model is fitted, loaded or served
    from routecast.predictors.gru import model

    return model


KIND = register(Kind("gru", GRUParams, GRUSpace, suggest, trial_params, from_trial, starting_points,
                     fit=lambda *args: _model().fit(*args), load=lambda config: _model().load(config),
                     reads_token=True, every_horizon=True))
