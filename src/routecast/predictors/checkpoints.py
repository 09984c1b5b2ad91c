"""Model files (`data/models/*.pt`): any kind as its plain config plus a state dict.

A checkpoint holds only tensors, numbers, strings, lists and dicts, so it loads with
`torch.load(weights_only=True)`: a file that needs anything else is refused, never unpickled.
"""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from routecast.errors import InputError
from routecast.pipeline.artifacts import save_torch
from routecast.predictors import registry


class CheckpointError(InputError):
    """A file given as a model is not a readable routecast checkpoint; the message names it."""


def save_checkpoint(path: str | Path, model: nn.Module, extra: dict[str, Any] | None = None) -> None:
    """Any kind's fitted module: its kind (`model.config.kind`), its plain config and its state dict."""
    config = model.config
    save_torch(path, {"kind": config.kind, "config": {k: v for k, v in asdict(config).items() if k != "kind"},
                      "state_dict": model.state_dict(), **(extra or {})})


def save_trained(path: str | Path, result: Any, fit_meta: Any, target: str) -> None:
    """A fitted `TrainResult` as train_full writes it: the model, its history and what serving needs."""
    save_checkpoint(path, result.model, {"history": result.history, "best_epoch": result.best_epoch,
                                         "best_value": result.best_value, "position_scale": fit_meta.position_scale,
                                         "target": target})


def load_checkpoint(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The model (eval mode, CPU) and the whole checkpoint dict."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found (run train_full first: dvc repro)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # weights_only refused a Python object: whatever this is, it is not a routecast checkpoint.
        raise CheckpointError(f"{path}: not a routecast model: it holds Python objects a routecast checkpoint never "
                              "has, so it was not loaded") from None
    except (zipfile.BadZipFile, RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable routecast model (truncated or not a torch file: "
                              f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); rebuild it with "
                              f"`dvc repro` or restore it with `dvc checkout {path}`") from None
    if not isinstance(checkpoint, dict) or not {"config", "state_dict"} <= set(checkpoint):
        raise CheckpointError(f"{path}: not a routecast model (no config and state_dict)")
    kind = checkpoint.get("kind", "mlp")
    if kind not in registry.names():
        raise CheckpointError(f"{path}: a model of kind {kind!r}, which this version does not know "
                              f"(known: {', '.join(registry.names())})")
    try:
        model = registry.get(kind).load(checkpoint["config"])
        model.load_state_dict(checkpoint["state_dict"])
    except (TypeError, ValueError, RuntimeError, KeyError) as exc:
        raise CheckpointError(f"{path}: a routecast model this version cannot rebuild: {exc}") from None
    return model.eval(), checkpoint
