"""The `context` kind: a small causal transformer over the tokens so far (its module:
`routecast.predictors.context.model`).

At token t and layer l it reads what a decoding engine knows then: every earlier token's whole
routing (all layers) and its token, this token's routing up to layer l (a GRU along its layers),
this token itself (`features.token`, through an embedding learned on the training tokens, with one
row for every token seen fewer than `min_count` times), and the previous token's experts at the
target layer. It predicts the experts of layer l + lookahead (a set, or the primary), and with
several targets (`features.horizons`, `features.next_token`) each of them from one head per target.

The earlier tokens' routing is known in decode: a token runs through every layer before the next
token starts. A prefill log gives the same routing, as the model is causal, so the kind learns from
it what a decoder would see. Training reads windows of `window` tokens of a sequence (a window
after the first repeats the previous half window as context, so every token sees at least
`window / 2` earlier tokens, or all of them).

Knobs (`<block>.context`): lr, dropout, width (model width), layers (transformer blocks), heads,
window (tokens per window), batch_windows (windows per training batch), min_count, earlier_tokens
(false: this token alone; the ablation that shows what the context adds).
Search space (`tune.search_space.context`): lr, dropout, width, layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from routecast.config.fields import FloatRange, IntRange, check, validate_fields
from routecast.predictors.registry import Kind, register


@dataclass(frozen=True)
class ContextParams:
    lr: float = 0.002
    dropout: float = 0.1
    width: int = 64  # model width (embeddings, GRU state, transformer)
    layers: int = 2  # transformer blocks over the tokens
    heads: int = 4  # attention heads (must divide width)
    window: int = 32  # tokens per training window (a later window repeats half of the one before as context)
    batch_windows: int = 8  # windows per training batch
    min_count: int = 2  # a token seen fewer times in training reads the unseen-token embedding
    earlier_tokens: bool = True  # false: read this token alone, none before it (an ablation: what context adds)

    def validate(self, key: str) -> None:
        check(self.lr > 0, f"{key}.lr", f"must be > 0, got {self.lr}")
        check(0.0 <= self.dropout < 1.0, f"{key}.dropout", f"must be in [0, 1), got {self.dropout}")
        for name in ("width", "layers", "heads", "batch_windows", "min_count"):
            check(getattr(self, name) >= 1, f"{key}.{name}", f"must be >= 1, got {getattr(self, name)}")
        check(self.window >= 2 and self.window % 2 == 0, f"{key}.window", f"must be even and >= 2, got {self.window}")
        check(self.width % self.heads == 0, f"{key}.heads", f"must divide width={self.width}, got {self.heads}")


@dataclass(frozen=True)
class ContextSpace:
    lr: FloatRange = field(default_factory=lambda: FloatRange(3e-4, 5e-3, log=True))
    dropout: FloatRange = field(default_factory=lambda: FloatRange(0.0, 0.3))
    width: IntRange = field(default_factory=lambda: IntRange(32, 128, 32))
    layers: IntRange = field(default_factory=lambda: IntRange(1, 3))

    def validate(self, key: str) -> None:
        validate_fields(self, key)
        check(0 <= self.dropout.low and self.dropout.high < 1, f"{key}.dropout", f"must lie in [0, 1), got "
              f"[{self.dropout.low}, {self.dropout.high}]")
        check(self.width.low % 4 == 0 and self.width.step % 4 == 0, f"{key}.width",
              "low and step must be multiples of 4 (the 4 attention heads must divide the width)")


def suggest(trial: Any, space: ContextSpace) -> ContextParams:
    return ContextParams(lr=trial.suggest_float("lr", space.lr.low, space.lr.high, log=space.lr.log),
                         dropout=trial.suggest_float("dropout", space.dropout.low, space.dropout.high,
                                                     log=space.dropout.log),
                         width=trial.suggest_int("ctx_width", space.width.low, space.width.high, step=space.width.step),
                         layers=trial.suggest_int("ctx_layers", space.layers.low, space.layers.high,
                                                  step=space.layers.step))


def trial_params(p: ContextParams) -> dict[str, Any]:
    return {"lr": p.lr, "dropout": p.dropout, "ctx_width": p.width, "ctx_layers": p.layers}


def from_trial(t: dict[str, Any]) -> ContextParams:
    return ContextParams(lr=float(t["lr"]), dropout=float(t["dropout"]), width=int(t["ctx_width"]),
                         layers=int(t["ctx_layers"]))


def starting_points(space: ContextSpace) -> list[tuple[str, ContextParams]]:
    return [("context_default", ContextParams(lr=space.lr.clip(2e-3), dropout=space.dropout.clip(0.1),
                                              width=space.width.clip(64), layers=space.layers.clip(2)))]


def _model() -> Any:  # the kind's torch side, imported only when a model is fitted, loaded or served
    from routecast.predictors.context import model

    return model


KIND = register(Kind("context", ContextParams, ContextSpace, suggest, trial_params, from_trial, starting_points,
                     fit=lambda *args: _model().fit(*args), load=lambda config: _model().load(config),
                     reads_token=True, every_horizon=True))
