"""Fit any kind on the fit split, choosing on the validation split.

`fit_predictor(params, train, fit, val)` is the one entry point (train_full, tune): the mixture is
fitted by EM (`routecast.predictors.em`); the neural kinds by the loop below, read top to bottom:

    AdamW (weight decay on weight matrices only, as nanoGPT's configure_optimizers), cross-entropy
    on the next primary (or, with `train.target: set`, on the next top-k set as a uniform target
    distribution), ReduceLROnPlateau and early stopping on the validation objective, the best
    epoch's weights kept. Batches are slices of tensors already in memory, shuffled once per epoch:
    samples for the MLPs, tokens for the GRU (every layer of a token in one pass), on the training
    device (`train.device`; bf16 autocast on CUDA). `lookup_mlp` is scored before its first step
    too (epoch 0: the lookup table itself, reported to `on_epoch` like any epoch), so early stopping
    can keep the table when training does not beat it on validation.

The objective is validation top-2 for `target: primary` and validation set recall for `set`.
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
from torch.nn import functional as F
from tqdm import tqdm

from routecast.data.batches import Inputs, predict_logits, sample_inputs, targets, token_view
from routecast.predictors.em import fit_mixture
from routecast.errors import InputError
from routecast.data.features import Features
from routecast.predictors.mixture import MixtureConfig
from routecast.predictors.neural import LookupMLP, ModelConfig, build_model
from routecast.config.params import ModelParams, TrainParams
from routecast.predictors.references import cross_fitted_lookup_scores, lookup_tables
from routecast.evaluate.scoring import sample_hits

log = logging.getLogger(__name__)

EpochCallback = Callable[[int, dict[str, float]], None]


@dataclass
class TrainResult:
    model: nn.Module
    history: list[dict[str, float]]  # one row per epoch
    best_epoch: int
    best_value: float  # the validation objective at the best epoch
    samples_per_second: float


def objective_name(target: str) -> str:
    return "val_top2" if target == "primary" else "val_set_recall"


def set_threads(threads: int | None) -> int:
    """Use `threads` threads (None: every core this process may run on, not every core of the machine)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    n = threads or usable
    torch.set_num_threads(n)
    return n


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"train.device: {device} asked for, but torch sees no CUDA device (use auto or cpu)")
    return torch.device(device)


def split_train_val(train: Features, max_train_samples: int | None = None, seed: int = 0) -> tuple[Features, Features]:
    """Separate the validation sequences marked by split_95_5; optionally subsample the rest by token
    (whole tokens, so a sequence model still sees whole paths)."""
    if train.is_val is None or not train.is_val.any():
        raise InputError("the train split marks no validation samples (is_val); rerun split_95_5")
    fit, val = train.take(~train.is_val), train.take(train.is_val)
    if max_train_samples is not None and len(fit) > max_train_samples:
        view = token_view(fit)
        per_token = -(-len(fit) // len(view))  # samples per token, rounded up: never more than asked
        keep = np.sort(np.random.default_rng(seed).choice(len(view), max(1, max_train_samples // per_token),
                                                          replace=False))
        rows = view.row[keep]
        fit = fit.take(np.sort(rows[rows >= 0]))
    return fit, val


def model_config(params: ModelParams, feats: Features) -> ModelConfig | MixtureConfig:
    """The plain config of `params`' kind for samples shaped like `feats`."""
    m = feats.meta
    num_prev = m.top_k if feats.prev_experts is not None else 0
    if params.kind == "mixture":
        mp = params.mixture
        return MixtureConfig(m.num_layers, m.num_experts, m.top_k, m.history_len, m.lookahead, mp.num_types,
                             mp.smoothing, mp.iterations, mp.restarts, num_prev=num_prev)
    num_extra = m.num_experts if feats.spec_logits is not None else 0
    expert_emb = params.gru.emb if params.kind == "gru" else params.expert_emb
    return ModelConfig(params.kind, m.num_layers, m.num_experts, m.top_k, m.history_len, m.lookahead,
                       params.layer_emb, expert_emb, tuple(params.architecture), params.dropout,
                       params.gru.hidden, params.gru.layers, num_prev, num_extra)


def validation_metrics(logits: torch.Tensor, val: Features, target: str) -> dict[str, float]:
    """Loss, top-1, top-2 (next primary) and set recall (next top-k set) of `logits` on `val`."""
    scores = logits.float().numpy()
    hits = sample_hits(scores, scores, val)
    return {"val_loss": loss_fn(logits, targets(val, target), target).item(),
            **{f"val_{m}": float(hits[m].mean()) for m in ("top1", "top2", "set_recall")}}


def loss_fn(logits: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Cross-entropy on the primary, or on the top-k set as a uniform target distribution."""
    if kind == "primary":
        return F.cross_entropy(logits.float(), target)
    logp = F.log_softmax(logits.float(), dim=1)
    return -((target * logp).sum(1) / target.sum(1)).mean()


def fit_predictor(params: ModelParams, train: TrainParams, fit: Features, val: Features, epochs: int | None = None,
                  on_epoch: EpochCallback | None = None, desc: str = "train") -> TrainResult:
    """Fit one predictor of `params.kind`; `on_epoch(epoch, row)` may raise (optuna.TrialPruned) to stop."""
    set_threads(train.threads)
    torch.manual_seed(train.seed)
    config = model_config(params, fit)
    if isinstance(config, MixtureConfig):
        return _fit_mixture(config, train, fit, val, epochs or train.epochs, on_epoch)
    return _train_neural(config, params.lr, params.gru.batch_tokens, train, fit, val, epochs or train.epochs,
                         on_epoch, desc)


def _fit_mixture(config: MixtureConfig, train: TrainParams, fit: Features, val: Features, epochs: int,
                 on_epoch: EpochCallback | None) -> TrainResult:
    """EM to convergence, reported once as the budget's last epoch: a pruner comparing trials at the
    same epoch then sets it against the neural kinds' final values, never their first ones."""
    start = time.perf_counter()
    module = fit_mixture(MixtureConfig(**{**config.__dict__, "target": train.target}), fit, seed=train.seed)
    seconds = time.perf_counter() - start
    row = {"epoch": epochs, "train_loss": float("nan"),
           **validation_metrics(predict_logits(module, val), val, train.target), "lr": float("nan"), "seconds": seconds}
    log.info("mixture: val top-2 %.4f, set recall %.4f (%.1fs)", row["val_top2"], row["val_set_recall"], seconds)
    if on_epoch is not None:
        on_epoch(epochs, row)
    return TrainResult(module, [row], epochs, row[objective_name(train.target)], len(fit) / max(seconds, 1e-9))


def configure_optimizer(model: nn.Module, lr: float, weight_decay: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on the weight matrices only: not on embeddings, norms and biases."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, plain = [], []
    for p in model.parameters():
        (decay if p.dim() >= 2 and id(p) not in embeddings else plain).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]
    # fused: one kernel per step instead of a dozen passes over every parameter tensor.
    return torch.optim.AdamW(groups, lr=lr, fused=device.type in ("cpu", "cuda"))


class _SampleBatches:
    """Shuffled slices of per-sample inputs (MLP kinds), all on the training device: no host work
    in an epoch but one shuffle of indices."""

    def __init__(self, inputs: Inputs, y: torch.Tensor, batch_size: int, table: torch.Tensor | None,
                 device: torch.device) -> None:
        self.inputs, self.y, self.batch_size = inputs.to(device), y.to(device), batch_size
        self.table = table.to(device) if table is not None else None
        n = len(y)
        self.n_used = n - 1 if n % batch_size == 1 else n  # BatchNorm cannot train on a batch of one

    def epoch(self, generator: torch.Generator):
        perm = torch.randperm(len(self.y), generator=generator)[: self.n_used].to(self.y.device)
        xs, ys = self.inputs.index(perm), self.y[perm]  # one gather, then slices
        table = self.table[perm] if self.table is not None else None
        for i in range(0, self.n_used, self.batch_size):
            sl = slice(i, i + self.batch_size)
            yield xs.index(sl), ys[sl], (table[sl] if table is not None else None)

    def forward(self, model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
        x, y, table = batch
        logits = model.forward_with_table(table, *x) if table is not None else model(*x)
        return logits, y


class _TokenBatches:
    """Shuffled batches of whole tokens (GRU): each token's path read once, all its samples scored.
    Everything stays on the training device."""

    def __init__(self, feats: Features, inputs: Inputs, y: torch.Tensor, tokens_per_batch: int,
                 device: torch.device) -> None:
        view = token_view(feats)
        self.rows = torch.from_numpy(view.row).to(device)  # [tokens, slots] -> sample row, -1: none
        self.history = torch.from_numpy(view.history.astype(np.int64)).to(device)
        self.inputs, self.y, self.per_batch = inputs.to(device), y.to(device), tokens_per_batch
        self.n_used = int((view.row >= 0).sum())

    def epoch(self, generator: torch.Generator):
        perm = torch.randperm(len(self.rows), generator=generator).to(self.rows.device)
        for i in range(0, len(perm), self.per_batch):
            tokens = perm[i:i + self.per_batch]
            rows = self.rows[tokens]
            present = rows >= 0
            sample = rows[present]
            yield (self.history[tokens], present.nonzero()[:, 0], self.inputs.index(sample), self.y[sample])

    def forward(self, model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
        history, token, x, y = batch
        logits = model.forward_tokens(history, token, x.layer, x.primary, x.secondary, x.gating, x.position, x.prev,
                                      x.extra)
        return logits, y


def _train_neural(config: ModelConfig, lr: float, batch_tokens: int, train: TrainParams, fit: Features,
                  val: Features, epochs: int, on_epoch: EpochCallback | None, desc: str) -> TrainResult:
    device = pick_device(train.device)
    model = build_model(config)
    inputs = sample_inputs(fit, use_prev=config.num_prev > 0, use_extra=config.num_extra > 0)
    y = targets(fit, train.target)
    table = None
    if isinstance(model, LookupMLP):
        model.set_tables(*lookup_tables(fit, train.target))
        # The table's log-probabilities for training samples come from tables fitted without their
        # own sequence (5 folds), so the correction learns how the table errs on unseen sequences.
        table = torch.from_numpy(np.log(np.maximum(cross_fitted_lookup_scores(fit, train.target, seed=train.seed),
                                                   1e-12))).float()
    model.to(device)
    batches = (_TokenBatches(fit, inputs, y, batch_tokens, device) if config.kind == "gru"
               else _SampleBatches(inputs, y, train.batch_size, table, device))
    optimizer = configure_optimizer(model, lr, train.weight_decay, device)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=train.lr_factor,
                                                           patience=train.lr_patience)
    generator = torch.Generator().manual_seed(train.seed)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    objective = objective_name(train.target)

    history: list[dict[str, float]] = []
    best_state, best_value, best_epoch, stale = None, -1.0, 0, 0
    if isinstance(model, LookupMLP):  # epoch 0: the lookup table alone
        row = {"epoch": 0, "train_loss": float("nan"), **validation_metrics(predict_logits(model, val, device=device),
                                                                            val, train.target),
               "lr": lr, "seconds": 0.0}
        history.append(row)
        best_state, best_value = copy.deepcopy(model.state_dict()), row[objective]
        if on_epoch is not None:
            on_epoch(0, row)
    seconds_training, samples_trained = 0.0, 0
    for epoch in (bar := tqdm(range(1, epochs + 1), desc=desc, unit="epoch", leave=False)):
        start = time.perf_counter()
        model.train()
        total_loss, n_seen = torch.zeros((), device=device), 0
        for batch in batches.epoch(generator):
            with autocast:
                logits, target = batches.forward(model, batch)
            loss = loss_fn(logits, target, train.target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += loss.detach() * len(logits)
            n_seen += len(logits)
        seconds_training += time.perf_counter() - start
        samples_trained += n_seen
        row = {"epoch": epoch, "train_loss": total_loss.item() / max(n_seen, 1),
               **validation_metrics(predict_logits(model, val, device=device), val, train.target),
               "lr": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - start}
        history.append(row)
        bar.set_postfix(loss=f"{row['train_loss']:.3f}", val=f"{row[objective]:.4f}")
        log.info("%s epoch %d: loss %.4f, val top-1 %.4f, top-2 %.4f, set recall %.4f, lr %.2e, %.1fs", desc, epoch,
                 row["train_loss"], row["val_top1"], row["val_top2"], row["val_set_recall"], row["lr"], row["seconds"])
        if row[objective] > best_value:
            best_value, best_epoch, stale = row[objective], epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            stale += 1
        if on_epoch is not None:
            on_epoch(epoch, row)
        scheduler.step(row[objective])
        if stale >= train.early_stopping_patience:
            log.info("%s: early stop after epoch %d (best %d, %s %.4f)", desc, epoch, best_epoch, objective, best_value)
            break
    assert best_state is not None
    model.load_state_dict(best_state)
    model.to("cpu").eval()
    return TrainResult(model, history, best_epoch, best_value, samples_trained / max(seconds_training, 1e-9))

