"""The training loop: AdamW, cross-entropy, ReduceLROnPlateau and early stopping on validation top-2.

Batches are slices of tensors already in memory (shuffled once per epoch), no Dataset or
DataLoader. The best epoch's weights are kept.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from routecast.features import Features
from routecast.model import Inputs, ModelConfig, RoutePredictor, predict_logits, to_inputs
from routecast.params import ModelParams, TrainParams

log = logging.getLogger(__name__)

EpochCallback = Callable[[int, dict[str, float]], None]


@dataclass
class TrainResult:
    model: RoutePredictor
    history: list[dict[str, float]]  # one row per epoch
    best_epoch: int
    best_val_top2: float
    samples_per_second: float


def set_threads(threads: int | None) -> int:
    n = threads or os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


def topk_accuracy(logits: torch.Tensor, target: torch.Tensor, k: int) -> float:
    if len(target) == 0:
        return float("nan")
    k = min(k, logits.shape[1])
    hits = (logits.topk(k, dim=1).indices == target.unsqueeze(1)).any(dim=1)
    return hits.float().mean().item()


def split_train_val(train: Features, max_train_samples: int | None = None, seed: int = 0) -> tuple[Features, Features]:
    """Separate the validation sequences marked by split_95_5; optionally subsample the rest."""
    if train.is_val is None or not train.is_val.any():
        raise ValueError("the train split marks no validation samples (is_val); rerun split_95_5")
    fit, val = train.take(~train.is_val), train.take(train.is_val)
    if max_train_samples is not None and len(fit) > max_train_samples:
        keep = np.sort(np.random.default_rng(seed).choice(len(fit), max_train_samples, replace=False))
        fit = fit.take(keep)
    return fit, val


def train_model(
    model_params: ModelParams,
    train_params: TrainParams,
    fit: Features,
    val: Features,
    epochs: int | None = None,
    on_epoch: EpochCallback | None = None,
    desc: str = "train",
) -> TrainResult:
    """Train one model; `on_epoch(epoch, metrics)` may raise (e.g. optuna.TrialPruned) to stop."""
    set_threads(train_params.threads)
    torch.manual_seed(train_params.seed)
    use_extra = fit.spec_logits is not None
    config = ModelConfig.build(fit.meta, model_params, num_extra=fit.meta.num_experts if use_extra else 0)
    model = RoutePredictor(config)
    # fused: one kernel per step instead of a dozen passes over every parameter tensor.
    optimizer = torch.optim.AdamW(model.parameters(), lr=model_params.lr, weight_decay=train_params.weight_decay,
                                  fused=True)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="max", factor=train_params.lr_factor, patience=train_params.lr_patience)
    loss_fn = nn.CrossEntropyLoss()
    x_fit, y_fit = to_inputs(fit, use_extra), torch.from_numpy(fit.target.astype(np.int64))
    x_val, y_val = to_inputs(val, use_extra), torch.from_numpy(val.target.astype(np.int64))
    generator = torch.Generator().manual_seed(train_params.seed)
    n, bs = len(y_fit), train_params.batch_size
    # BatchNorm cannot train on a batch of one: drop a trailing single sample.
    n_used = n - 1 if n % bs == 1 else n
    epochs = epochs or train_params.epochs

    history: list[dict[str, float]] = []
    best_state, best_top2, best_epoch, stale = None, -1.0, 0, 0
    seconds_training = 0.0
    for epoch in (bar := tqdm(range(1, epochs + 1), desc=desc, unit="epoch", leave=False)):
        start = time.perf_counter()
        model.train()
        perm = torch.randperm(n, generator=generator)[:n_used]
        xs, ys = x_fit.index(perm), y_fit[perm]  # one gather per epoch, then contiguous slices
        total_loss = torch.zeros(())
        for i in range(0, n_used, bs):
            logits = model(*xs.index(slice(i, i + bs)))
            loss = loss_fn(logits, ys[i: i + bs])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += loss.detach() * len(logits)
        seconds_training += time.perf_counter() - start
        val_logits = predict_logits(model, x_val)
        row = {
            "epoch": epoch,
            "train_loss": total_loss.item() / max(n_used, 1),
            "val_loss": loss_fn(val_logits, y_val).item(),
            "val_top1": topk_accuracy(val_logits, y_val, 1),
            "val_top2": topk_accuracy(val_logits, y_val, 2),
            "lr": optimizer.param_groups[0]["lr"],
            "seconds": time.perf_counter() - start,
        }
        history.append(row)
        bar.set_postfix(loss=f"{row['train_loss']:.3f}", val_top2=f"{row['val_top2']:.4f}")
        log.info("%s epoch %d: loss %.4f, val top-1 %.4f, top-2 %.4f, lr %.2e, %.1fs", desc, epoch,
                 row["train_loss"], row["val_top1"], row["val_top2"], row["lr"], row["seconds"])
        if row["val_top2"] > best_top2:
            best_top2, best_epoch, stale = row["val_top2"], epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            stale += 1
        if on_epoch is not None:
            on_epoch(epoch, row)
        scheduler.step(row["val_top2"])
        if stale >= train_params.early_stopping_patience:
            log.info("%s: early stop after epoch %d (best %d, val top-2 %.4f)", desc, epoch, best_epoch, best_top2)
            break
    assert best_state is not None
    model.load_state_dict(best_state)
    model.eval()
    throughput = n_used * len(history) / max(seconds_training, 1e-9)
    return TrainResult(model, history, best_epoch, best_top2, throughput)


def inputs_for(model: RoutePredictor, feats: Features) -> Inputs:
    return to_inputs(feats, use_extra=model.config.num_extra > 0)
