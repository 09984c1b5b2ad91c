"""Fit any kind on the fit split, choosing on the validation split.

`fit_predictor(params, train, fit, val)` is the one entry point (train_full, tune): it hands the
`baseline` or `tuned` block to its kind (`routecast.predictors.registry`), whose `fit` builds its
module and, for the neural kinds, runs the loop below (`train_neural`), read top to bottom:

    AdamW (weight decay on weight matrices only: not on embeddings, norms and biases), cross-entropy
    on the next primary (or, with `train.target: set`, on the next top-k set as a uniform target
    distribution), ReduceLROnPlateau and early stopping on the validation objective, the best
    epoch's weights kept. Batches are slices of tensors already on the training device
    (`train.device`; bf16 autocast on CUDA), shuffled once per epoch: samples (`SampleBatches`) or
    whole tokens (`TokenBatches`, every layer of a token in one pass). A kind whose untrained module
    is already a predictor (`lookup_mlp` starts at the lookup table) is scored before its first
    step (epoch 0, reported to `on_epoch` like any epoch), so early stopping can keep it.

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

from routecast.config.params import ModelParams, TrainParams, target_key
from routecast.data.batches import Inputs, predict_logits, targets, token_view
from routecast.data.features import Features
from routecast.errors import InputError
from routecast.evaluate.scoring import sample_hits
from routecast.predictors import registry
from routecast.predictors.horizons import every_head

log = logging.getLogger(__name__)

EpochCallback = Callable[[int, dict[str, float]], None]


@dataclass
class TrainResult:
    model: nn.Module
    history: list[dict[str, float]]  # one row per epoch
    best_epoch: int
    best_value: float  # the validation objective at the best epoch
    samples_per_second: float


def objective_name(target: str, d: int | None = None) -> str:
    """The validation figure a run is judged by: top-2 (`primary`) or set recall (`set`), of the main
    horizon, or (`d`) of a later target: `val_top2_h4`, `val_set_recall_next_token` (see `validate`)."""
    name = "val_top2" if target == "primary" else "val_set_recall"
    return name if d is None else f"{name}_{target_key(d)}"


@torch.no_grad()
def validate(model: nn.Module, val: Features, target: str, device: torch.device | str = "cpu") -> dict[str, float]:
    """`validation_metrics` of the main horizon's head; for a module with a head per target (several
    `features.horizons`, `features.next_token`) also each later target's top-2 and set recall on the
    samples with that target (`val_top2_h4`, `val_set_recall_next_token`, ...), from the same pass."""
    if (getattr(model, "heads", 1) == 1 or val.horizon_set is None
            or tuple(getattr(model.config, "horizons", ())) != tuple(val.meta.horizons)):
        return validation_metrics(predict_logits(model, val, device=device), val, target)
    with every_head(model):
        every = predict_logits(model, val, device=device)  # [N, heads, E]
    row = validation_metrics(every[:, 0], val, target)
    for j, d in enumerate(val.meta.horizons[1:], 1):
        rows = np.flatnonzero(val.horizon_set[:, j, 0] >= 0)
        scores = every[rows, j].float().numpy()
        hits = sample_hits(scores, scores, val.at_horizon(d))
        for m in ("top2", "set_recall"):
            value = float(hits[m].mean()) if len(rows) and (val.meta.weighted or m == "set_recall") else float("nan")
            row[f"val_{m}_{target_key(d)}"] = value
    return row


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


def validation_metrics(logits: torch.Tensor, val: Features, target: str) -> dict[str, float]:
    """Loss, top-1, top-2 (next primary) and set recall (next top-k set) of `logits` on `val`; top-1
    and top-2 are NaN for a trace without a primary (not logged, never an objective there)."""
    scores = logits.float().numpy()
    hits = sample_hits(scores, scores, val)
    primary = val.meta.weighted
    return {"val_loss": loss_fn(logits, targets(val, target), target).item(),
            **{f"val_{m}": float(hits[m].mean()) if primary or m == "set_recall" else float("nan")
               for m in ("top1", "top2", "set_recall")}}


def loss_fn(logits: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Cross-entropy on the primary, or on the top-k set as a uniform target distribution.

    Every horizon's head at once (logits [B, H, E]; target [B, H] or [B, H, k] expert ids, -1 where a
    sample has no target at that horizon): each head's mean over its samples, averaged over heads."""
    if logits.dim() == 3:
        logp = F.log_softmax(logits.float(), dim=2)
        ids = target if target.dim() == 3 else target.unsqueeze(2)
        valid = (ids[:, :, 0] >= 0).float()  # [B, H]
        per_sample = -logp.gather(2, ids.clamp(min=0)).mean(2)  # [B, H]
        per_head = (per_sample * valid).sum(0) / valid.sum(0).clamp(min=1.0)
        return per_head.mean()
    if kind == "primary":
        return F.cross_entropy(logits.float(), target)
    logp = F.log_softmax(logits.float(), dim=1)
    return -((target * logp).sum(1) / target.sum(1)).mean()


def fit_predictor(params: ModelParams, train: TrainParams, fit: Features, val: Features, epochs: int | None = None,
                  on_epoch: EpochCallback | None = None, desc: str = "train") -> TrainResult:
    """Fit one predictor of `params.kind`; `on_epoch(epoch, row)` may raise (optuna.TrialPruned) to stop."""
    set_threads(train.threads)
    torch.manual_seed(train.seed)
    train = train.for_samples(fit.meta.weighted)
    kind = registry.get(params.kind)
    return kind.fit(params.config, train, fit, val, epochs or train.epochs, on_epoch, desc)


def scored_once(module: nn.Module, train: TrainParams, fit: Features, val: Features, epochs: int, seconds: float,
                on_epoch: EpochCallback | None) -> TrainResult:
    """The result of a kind fitted in one go (no epochs: the mixture's EM), reported once as the
    budget's last epoch: a pruner comparing trials at the same epoch then sets it against the
    neural kinds' final values, never their first ones."""
    row = {"epoch": epochs, "train_loss": float("nan"), **validate(module, val, train.target), "lr": float("nan"),
           "seconds": seconds}
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


GATHER_SAMPLES = 1 << 16  # samples gathered at once in a shuffled epoch (SampleBatches)


class SampleBatches:
    """Shuffled slices of per-sample inputs (the MLP kinds), all on the training device: no host work
    in an epoch but one shuffle of indices."""

    def __init__(self, inputs: Inputs, y: torch.Tensor, batch_size: int, device: torch.device) -> None:
        self.inputs, self.y, self.batch_size = inputs.to(device), y.to(device), batch_size
        n = len(y)
        self.n_used = n - 1 if n % batch_size == 1 else n  # BatchNorm cannot train on a batch of one

    def order(self, generator: torch.Generator) -> torch.Tensor:
        return torch.randperm(len(self.y), generator=generator)[: self.n_used].to(self.y.device)

    def gather(self, idx: torch.Tensor) -> tuple:
        """The samples `idx`: (inputs, targets, ...)."""
        return self.inputs.index(idx), self.y[idx]

    def epoch(self, generator: torch.Generator):
        perm = self.order(generator)
        # Gather a chunk of whole batches at once, then slice: few gathers, and memory bounded by
        # the chunk, not by the training set (at 64 experts a dense set target is 256 bytes a sample).
        chunk = self.batch_size * max(1, GATHER_SAMPLES // self.batch_size)
        for start in range(0, self.n_used, chunk):
            gathered = self.gather(perm[start:start + chunk])
            for i in range(0, len(gathered[1]), self.batch_size):
                cut = slice(i, i + self.batch_size)
                yield tuple(part.index(cut) if isinstance(part, Inputs) else part[cut] for part in gathered)

    def forward(self, model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        return model(*x), y


class TokenBatches:
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
                                      x.extra, x.token)
        return logits, y


def train_neural(model: nn.Module, batches: SampleBatches | TokenBatches, lr: float, train: TrainParams,
                 val: Features, epochs: int, on_epoch: EpochCallback | None, desc: str,
                 score_first: bool = False) -> TrainResult:
    """The loop of the neural kinds (see the module doc); `score_first`: score the untrained module as
    epoch 0 (a kind that starts as a predictor)."""
    device = batches.y.device
    model.to(device)
    optimizer = configure_optimizer(model, lr, train.weight_decay, device)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=train.lr_factor,
                                                           patience=train.lr_patience)
    generator = torch.Generator().manual_seed(train.seed)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    objective = objective_name(train.target)

    history: list[dict[str, float]] = []
    best_state, best_value, best_epoch, stale = None, -1.0, 0, 0
    if score_first:
        row = {"epoch": 0, "train_loss": float("nan"), **validate(model, val, train.target, device), "lr": lr,
               "seconds": 0.0}
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
            with autocast, every_head(model):
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
               **validate(model, val, train.target, device),
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
