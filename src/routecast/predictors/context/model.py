"""The `context` kind's module: a causal transformer over the tokens, a GRU along each token's layers.

For a window of W tokens of one sequence (every layer of each):

    z[t, j]   = sum of the embeddings of (layer j, expert e) over the experts e of token t at layer j
    path[t,l] = GRU over z[t, 0..l]                       this token's routing up to layer l
    x[t]      = W_f z[t-1, all layers] + token[t] + pos[t] the previous token's whole routing, this token
    ctx[t]    = causal transformer over x[..t]             every earlier token's routing and tokens
    logit[t,l]= head(ctx[t] + path[t,l] + W_p z[t-1, l + lookahead] + layer[l])
                + sum over e in token t's set at l of   A[l, e]      (a learned co-occurrence table)
                + sum over e in token t-1's set at l+la of P[l, e]  (the same across tokens)

so the prediction for (t, l) reads nothing of token t past layer l. With several targets
(`features.horizons`, `features.next_token`) the head has one output block per target, trained
together (`routecast.predictors.horizons`); the wide tables feed the main horizon's block only.
The samples' rows come from `Features` in (sequence, token, layer) order (each split keeps it): a
token's routing at layer j is its `current_set` at j, or, for the last `lookahead` layers, the
`target_set` of the sample that predicts them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from routecast.config.params import TrainParams
from routecast.data.batches import targets, token_view
from routecast.data.features import Features
from routecast.errors import InputError
from routecast.fit.training import EpochCallback, TrainResult, pick_device, train_neural
from routecast.predictors.context import ContextParams
from routecast.predictors.horizons import at_horizon, pick_head
from routecast.predictors.tokens import build_vocab, token_rows


@dataclass(frozen=True)
class ContextConfig:
    kind: str
    num_layers: int
    num_experts: int
    top_k: int
    lookahead: int
    history_len: int
    width: int = 64
    layers: int = 2
    heads: int = 4
    window: int = 32
    dropout: float = 0.1
    vocab_size: int = 0  # tokens with their own embedding (0: features.token off)
    earlier_tokens: bool = True  # False: read this token alone (no transformer, no previous token)
    num_prev: int = 0  # the Predictor's bookkeeping: this kind reads no per-sample optional feature
    num_extra: int = 0
    horizons: tuple[int, ...] = ()  # every target it predicts (features.horizons, NEXT_TOKEN); () reads as (lookahead,)

    def __post_init__(self) -> None:
        object.__setattr__(self, "horizons", tuple(int(d) for d in self.horizons) or (self.lookahead,))

    @property
    def slots(self) -> int:
        return self.num_layers - self.lookahead

    @property
    def reads_token(self) -> bool:
        return self.vocab_size > 0


# --------------------------------------------------------------------------- the samples as token windows


@dataclass
class Tokens:
    """The tokens of a Features table: each one's routing at every layer, its vocabulary key, and
    the rows of its samples; plus windows over them (see `windows`)."""

    route: torch.Tensor  # int64 [T + 1, L, k]: expert + 1 (0: unknown); row T is a blank token (window padding)
    key: torch.Tensor  # int64 [T + 1]: the token's key (-1: none)
    row: np.ndarray  # int64 [T, slots]: the sample row of (token, layer l), -1: none
    window: np.ndarray  # int64 [n_windows, W]: token index (T: padding)
    scored: np.ndarray  # bool [n_windows, W]: this window predicts that token's samples


def tokens_of(feats: Features, window: int) -> Tokens:
    if feats.current_set is None:
        raise InputError("the context kind needs the current_set feature: re-encode the features "
                         "(dvc repro encode_features)")
    meta = feats.meta
    L, k, la = meta.num_layers, meta.top_k, meta.lookahead
    view = token_view(feats)
    row = view.row
    T, S = row.shape
    route = np.zeros((T + 1, L, k), dtype=np.int64)
    present = row >= 0
    tok, lay = np.nonzero(present)
    route[tok, lay] = feats.current_set[row[present]].astype(np.int64) + 1
    route[tok, lay + la] = np.where(route[tok, lay + la] > 0, route[tok, lay + la],
                                    feats.target_set[row[present]].astype(np.int64) + 1)
    first = np.where(present.any(axis=1), row.max(axis=1), 0)  # any sample row of each token
    key = np.full(T + 1, -1, dtype=np.int64)
    if feats.token is not None and T:
        key[:T] = feats.token[first]
    seq = feats.seq_id[first] if T else np.zeros(0, dtype=np.int32)
    starts = np.flatnonzero(np.r_[True, seq[1:] != seq[:-1]]) if T else np.zeros(0, dtype=np.int64)
    ends = np.r_[starts[1:], T].astype(np.int64)
    half = window // 2
    windows, scored = [], []
    for a, b in zip(starts.tolist(), ends.tolist()):
        s = a
        while True:
            idx = np.arange(s, s + window)
            keep = idx < b
            score = keep & ((idx >= s + window - half) if s > a else keep)
            windows.append(np.where(keep, idx, T))
            scored.append(score)
            if s + window >= b:
                break
            s += half
    return Tokens(torch.from_numpy(route), torch.from_numpy(key), row, np.array(windows, dtype=np.int64).reshape(
        -1, window), np.array(scored, dtype=bool).reshape(-1, window))


# --------------------------------------------------------------------------- the module


class ContextPredictor(nn.Module):
    def __init__(self, config: ContextConfig) -> None:
        super().__init__()
        self.config = config
        L, E, d = config.num_layers, config.num_experts, config.width
        self.num_experts, self.lookahead, self.slots = E, config.lookahead, config.slots
        # output heads, one per target (config.heads is the attention's); the call returns horizon_head's
        self.heads, self.horizon_head = len(config.horizons), 0
        self.set_emb = nn.Embedding(L * (E + 1), d)  # (layer j, expert + 1); id 0: unknown at that layer
        self.register_buffer("layer_offset", (torch.arange(L) * (E + 1)).view(1, 1, L, 1))
        self.path = nn.GRU(d, d, batch_first=True)
        self.whole = nn.Linear(L * d, d)  # the previous token's whole routing
        self.start = nn.Parameter(torch.zeros(d))  # in place of it for a window's first token
        self.prev_at_target = nn.Linear(d, d)
        self.token_emb = nn.Embedding(config.vocab_size + 1, d)  # row 0: unseen (or no token)
        self.register_buffer("vocab", torch.zeros(config.vocab_size, dtype=torch.long))
        self.pos_emb = nn.Embedding(config.window, d)
        self.layer_emb = nn.Embedding(config.slots, d)
        block = nn.TransformerEncoderLayer(d, config.heads, 2 * d, config.dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.context = nn.TransformerEncoder(block, config.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        # The wide part: tables from the current set, and from the previous token's set at the target
        # layer, straight to the logits (zero at the start), as the set_lookup reference counts them.
        self.wide_now = nn.Embedding(config.slots * (E + 1), E)
        self.wide_prev = nn.Embedding(config.slots * (E + 1), E)
        nn.init.zeros_(self.wide_now.weight)
        nn.init.zeros_(self.wide_prev.weight)
        self.head = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Dropout(config.dropout),
                                  nn.Linear(2 * d, self.heads * E))
        self.drop = nn.Dropout(config.dropout)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        state_dict.pop(prefix + "causal", None)  # checkpoints that kept the mask as a buffer
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def token_index(self, key: torch.Tensor) -> torch.Tensor:
        """Embedding row of each token key: 1 + its place in the vocabulary, 0 if not in it."""
        return token_rows(self.vocab, key)

    def forward(self, route: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """route [B, W, L, k] (+1 ids), key [B, W] -> logits [B, W, slots, E] for every (token, layer l)."""
        B, W, L, _ = route.shape
        S, d = self.slots, self.config.width
        z = self.set_emb(route + self.layer_offset).sum(3)  # [B, W, L, d]
        path, _ = self.path(self.drop(z[:, :, :S].reshape(B * W, S, d)))
        offset = self.layer_offset[:, :, :S]
        wide = self.wide_now(route[:, :, :S] + offset).sum(3)
        token = self.token_emb(self.token_index(key))
        if not self.config.earlier_tokens:  # the ablation: this token alone
            h = token.unsqueeze(2) + path.view(B, W, S, d) + self.layer_emb.weight
            return self.with_wide(self.head(self.norm(h)), wide)
        previous = F.pad(z, (0, 0, 0, 0, 1, 0))[:, :W]  # token t-1's z (zeros before the window's first)
        whole = self.whole(previous.reshape(B, W, L * d))
        whole[:, 0] = self.start
        # positions and the causal mask made for W tokens (not sliced from window-sized ones: a slice
        # would tie torch.export's dynamic token count to W < window)
        x = whole + token + self.pos_emb(torch.arange(W, device=route.device))
        causal = torch.triu(torch.full((W, W), float("-inf"), device=route.device), 1)
        ctx = self.context(self.drop(x), mask=causal, is_causal=True)  # [B, W, d]
        h = (ctx.unsqueeze(2) + path.view(B, W, S, d) + self.prev_at_target(previous[:, :, self.lookahead:])
             + self.layer_emb.weight)
        wide = wide + self.wide_prev(F.pad(route, (0, 0, 0, 0, 1, 0))[:, :W, self.lookahead:] + offset).sum(3)
        return self.with_wide(self.head(self.norm(h)), wide)

    def with_wide(self, out: torch.Tensor, wide: torch.Tensor) -> torch.Tensor:
        """The head's [B, W, S, heads * E] with the wide tables added to the main horizon's block (the first E)."""
        if self.heads == 1:
            return out + wide
        E = self.num_experts
        return torch.cat([out[..., :E] + wide, out[..., E:]], dim=-1)

    def at_horizon(self, d: int) -> nn.Module:
        return at_horizon(self, d)

    @torch.no_grad()
    def predict_samples(self, feats: Features, batch_size: int = 8192, device: torch.device | str = "cpu"
                        ) -> torch.Tensor:
        """Logits [N, E] for every sample of `feats` (whole sequences, in order), on the CPU ([N, heads, E]
        within `every_head`)."""
        self.eval()
        self.check_features(feats)
        tokens = tokens_of(feats, self.config.window)
        every = self.heads > 1 and self.horizon_head < 0  # within every_head: [N, heads, E]
        out = torch.zeros((len(feats), self.heads, self.num_experts) if every else (len(feats), self.num_experts))
        per_batch = max(1, batch_size // max(self.config.window * self.slots, 1))
        for i in range(0, len(tokens.window), per_batch):
            logits, rows = window_logits(self, tokens, np.arange(i, min(i + per_batch, len(tokens.window))), device)
            out[rows] = logits.float().cpu()
        return out

    def check_features(self, feats: Features) -> None:
        if self.config.vocab_size and feats.token is None:
            raise InputError("this context model was trained with features.token, but these samples have no token "
                             "column: encode them with features.token: true")


class ContextEngine(nn.Module):
    """The context kind as an engine calls it, once per layer (`routecast.Predictor.predict_context`).

    forward(route [B, W, num_layers, top_k] int: the experts of each sequence's last W tokens
    (W <= window), raw ids, -1 unknown (the last token is the one predicted: its layers past l are
    unknown, and never read for layer l anyway), key [B, W] int: their token keys (-1: none)) ->
    logits [B, slots, E]: the last token's experts at layer l + lookahead, for every layer l."""

    def __init__(self, model: ContextPredictor) -> None:
        super().__init__()
        self.core = model.eval()
        c = model.config
        self.num_layers, self.num_experts, self.top_k, self.window = c.num_layers, c.num_experts, c.top_k, c.window
        self.heads = model.heads

    def forward(self, route: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        return self.core((route.long() + 1).clamp(min=0), key.long())[:, -1, :, :self.num_experts]  # main horizon

    @torch.jit.export
    def predict(self, route: torch.Tensor, key: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The last token's k best experts at every layer l + lookahead, best first ([B, slots, k]),
        and their probabilities (softmax over all)."""
        scores, best = torch.softmax(self.forward(route, key), dim=2).topk(k, dim=2)
        return best, scores

    @torch.jit.export
    def predict_horizons(self, route: torch.Tensor, key: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`predict` for every target at once (every horizon, then the next token): [B, slots, heads, k]."""
        every = self.core((route.long() + 1).clamp(min=0), key.long())[:, -1]  # [B, S, heads * E]
        every = every.view(every.shape[0], every.shape[1], self.heads, self.num_experts)
        scores, best = torch.softmax(every, dim=3).topk(k, dim=3)
        return best, scores


def window_logits(model: ContextPredictor, tokens: Tokens, windows: np.ndarray, device: torch.device | str
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits of the samples the `windows` score, and those samples' rows."""
    index = tokens.window[windows]  # [B, W]
    blank = len(tokens.row)
    used = int(np.flatnonzero((index != blank).any(axis=0)).max(initial=0)) + 1  # padding only after it
    index = index[:, :used]
    logits = model(tokens.route[index].to(device), tokens.key[index].to(device))  # [B, used, S, heads * E]
    scored = tokens.scored[windows][:, :used]
    token = index[scored]  # the scored tokens, in (window, position) order
    rows = tokens.row[token]  # [n, S]
    b, w = np.nonzero(scored)
    t_i, layer = np.nonzero(rows >= 0)
    pick_b, pick_w = torch.from_numpy(b[t_i]).to(device), torch.from_numpy(w[t_i]).to(device)
    picked = pick_head(logits[pick_b, pick_w, torch.from_numpy(layer).to(device)], model.heads, model.horizon_head)
    return picked, torch.from_numpy(rows[t_i, layer])


class WindowBatches:
    """Shuffled batches of windows (`batch_windows` at a time); every scored sample of a window is one
    training sample."""

    def __init__(self, tokens: Tokens, y: torch.Tensor, per_batch: int, device: torch.device) -> None:
        self.tokens, self.per_batch, self.device = tokens, per_batch, device
        self.y = y.to(device)
        self.n_used = int((tokens.row >= 0).sum())

    def epoch(self, generator: torch.Generator):
        perm = torch.randperm(len(self.tokens.window), generator=generator).numpy()
        for i in range(0, len(perm), self.per_batch):
            yield perm[i:i + self.per_batch]

    def forward(self, model: nn.Module, batch: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        logits, rows = window_logits(model, self.tokens, batch, self.device)
        return logits, self.y[rows.to(self.device)]


def fit(params: ContextParams, train: TrainParams, fit_split: Features, val: Features, epochs: int,
        on_epoch: EpochCallback | None, desc: str) -> TrainResult:
    m = fit_split.meta
    vocab = build_vocab(fit_split, params.min_count)
    config = ContextConfig("context", m.num_layers, m.num_experts, m.top_k, m.lookahead, m.history_len,
                           width=params.width, layers=params.layers, heads=params.heads, window=params.window,
                           dropout=params.dropout, vocab_size=len(vocab), earlier_tokens=params.earlier_tokens,
                           horizons=m.horizons)
    model = ContextPredictor(config)
    model.vocab.copy_(torch.from_numpy(vocab))
    batches = WindowBatches(tokens_of(fit_split, params.window),
                            targets(fit_split, train.target, every_horizon=True),
                            params.batch_windows, pick_device(train.device))
    return train_neural(model, batches, params.lr, train, val, epochs, on_epoch, desc)


def load(config: dict) -> ContextPredictor:
    return ContextPredictor(ContextConfig(**{**config, "kind": "context"}))

