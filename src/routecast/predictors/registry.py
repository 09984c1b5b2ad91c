"""The predictor kinds: each one declares, in its own module, everything the pipeline needs of it.

A `Kind` names its knobs (the dataclass under `<block>.<kind>` in params.yaml: `tuned.gru.lr`), its
search space (`tune.search_space.<kind>`), how tune draws a configuration and reads one back from a
trial, the configurations a new study starts from, how it is fitted, how a checkpoint rebuilds it,
and what the `Predictor` runs. The built-in kinds (`mlp`, `lookup_mlp`, `gru`, `mixture`, `context`: one
sub-package each in `routecast.predictors`) register themselves when first asked for; adding a kind
is one module that calls `register` (tests/test_registry.py adds one from the test suite alone).

A kind's declaration (`predictors/<kind>/__init__.py`) stays light (no torch at import): params
checks and tune's bookkeeping read it without loading a model; its `fit`, `load` and `serve` live
beside the kind's torch module (`predictors/<kind>/model.py`), imported when first called.

A kind's module has a `config` that says what the `Predictor` wraps around it: `kind`, `num_layers`,
`num_experts`, `top_k`, `history_len`, `lookahead`, `num_prev`, `num_extra`, `reads_token` (it reads
the token: the module was trained with features.token); it is called with the
tensors of `routecast.data.batches.Inputs` and returns logits (or log-probabilities) over the
experts of layer l + lookahead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from routecast.config.fields import ParamsError


def _same(module: Any) -> Any:
    return module


@dataclass(frozen=True)
class Kind:
    name: str
    params: type  # its knobs: a frozen dataclass with defaults (params.yaml: `<block>.<name>`)
    space: type  # its search space: a frozen dataclass with defaults (`tune.search_space.<name>`)
    suggest: Callable[[Any, Any], Any]  # (optuna trial, space) -> params
    trial_params: Callable[[Any], dict[str, Any]]  # params -> the Optuna params `suggest` would give them
    from_trial: Callable[[dict[str, Any]], Any]  # a finished trial's Optuna params -> params
    starting_points: Callable[[Any], list[tuple[str, Any]]]  # space -> (origin, params) a new study runs first
    # (params, TrainParams, fit Features, val Features, epochs, on_epoch, desc) -> routecast.fit.training.TrainResult
    fit: Callable[..., Any]
    load: Callable[[dict[str, Any]], Any]  # a checkpoint's plain config -> the kind's module (weights not loaded)
    serve: Callable[[Any], Any] = _same  # the fitted eval-mode module -> the module the Predictor runs
    reads_token: bool = False  # it reads the `token` feature (features.token)
    every_horizon: bool = False  # one fit predicts every horizon of features.horizons (routecast.predictors.horizons)


_KINDS: dict[str, Kind] = {}


def register(kind: Kind) -> Kind:
    """Add a kind (a second registration of the same name replaces the first: a module reloaded)."""
    _KINDS[kind.name] = kind
    return kind


def _builtins() -> None:
    # Imported here, not at the top: each kind's module calls `register`, defined above.
    from routecast.predictors import context, gru, lookup_mlp, mixture, mlp  # noqa: F401


def names() -> tuple[str, ...]:
    _builtins()
    return tuple(_KINDS)


def get(name: str, key: str = "kind") -> Kind:
    """The kind called `name`; a `ParamsError` naming `key` and the known kinds if there is none."""
    _builtins()
    if name not in _KINDS:
        raise ParamsError(key, f"unknown kind {name!r} (known: {', '.join(_KINDS)})")
    return _KINDS[name]
