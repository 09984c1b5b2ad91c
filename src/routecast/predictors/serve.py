"""The trained predictor, any kind, as an inference engine calls it once per MoE layer.

    from routecast import Predictor
    predictor = Predictor.load("data/models/tuned.pt")          # a train_full checkpoint
    experts, scores = predictor.predict(layer, history, experts_now, weights_now, token_pos)
    # trained with several features.horizons (and features.next_token): every horizon's top-k, then the
    # next token's at this layer, [N, len(horizons) + next_token, k], from one call
    experts, scores = predictor.predict_horizons(layer, history, experts_now, weights_now, token_pos)
    # trained with features.token: also token=the token's id (or routecast.data.features.text_keys of its text)
    predictor.export("tuned.ts")                                 # TorchScript (or .pt2: torch.export)
    predictor = Predictor.load("tuned.ts")                       # the export, without the checkpoint

The call takes the routing state of a batch of tokens once layer `l` has routed them (raw ids,
-1 for unknown) and returns the top-k experts expected at layer `l + lookahead`, best first,
with their probabilities. `EngineModule` turns the raw state into the model's inputs (history
entries past `l` ignored, +1 id encodings, position scaling) in front of the kind's own module,
so the export holds the whole path from raw state to experts.

Each kind says what runs (its registry entry's `serve`): the `mlp` kind runs a fused form of its
eval-mode MLP (`routecast.predictors.mlp.model.FusedMLP`: BatchNorm folded into the Linear before
it and every embedding multiplied through the first Linear, so the first layer is one
`embedding_bag` plus one small matmul; its logits equal the eager model's to float32 rounding).
The other kinds run their own eval-mode module.

Exports, both loadable with torch alone: `.ts` (TorchScript; `torch.jit.load(path).predict(...)`
in Python or libtorch) and `.pt2` (torch.export: an ExportedProgram with a dynamic batch,
`torch.export.load(path).module()`, which AOTInductor can compile for C++). torch deprecates
TorchScript and steers to torch.export, but on the CPU the TorchScript call is 1.1 to 4.9x
faster (p50, 1 thread) for every kind (benchmarks/bench_predictor.py), so both stay; an engine on a GPU or in C++ takes
the `.pt2`.
"""

from __future__ import annotations

import copy
import json
import warnings
import zipfile
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from routecast.config.params import NEXT_TOKEN, POSITION_SCALE
from routecast.data.features import Features
from routecast.errors import InputError
from routecast.pipeline.artifacts import atomic_path
from routecast.predictors import registry
from routecast.predictors.checkpoints import load_checkpoint


class Prediction(NamedTuple):
    experts: torch.Tensor  # int64 [N, k], best first
    scores: torch.Tensor  # float32 [N, k], their probabilities


class EngineModule(nn.Module):
    """Raw routing state -> the kind's inputs -> logits over the next layer's experts.

    forward(layer [N], history [N, <=H] (expert ids at layers 0..; -1 unknown; entries past
    `layer` ignored), experts [N, k] (the top-k at `layer`, best first), weights [N, k],
    token_pos [N], extra [N, X], prev [N, P] (the previous token's top-k at the target layer,
    -1 unknown; P = 0 unless trained with features.prev_token), token [N] (the token's key, -1:
    none; read only by a model trained with features.token)).

    `predict_horizons` gives every horizon of a kind with one head per horizon (features.horizons)
    from the same call: `every` is the core answering with every head (the same weights)."""

    def __init__(self, core: nn.Module, config: Any, position_scale: float) -> None:
        super().__init__()
        self.core = core
        self.horizons = list(getattr(config, "horizons", (config.lookahead,)))
        self.every: nn.Module | None = None
        if len(self.horizons) > 1:
            self.every = copy.copy(core)  # shares every parameter and buffer
            self.every.horizon_head = -1
        self.num_layers, self.num_experts, self.top_k = config.num_layers, config.num_experts, config.top_k
        self.history_len, self.lookahead = config.history_len, config.lookahead
        self.num_prev, self.num_extra = config.num_prev, config.num_extra
        self.reads_token = config.reads_token
        self.position_scale = float(position_scale)
        self.register_buffer("slot", torch.arange(config.history_len).unsqueeze(0))

    def forward(self, layer: torch.Tensor, history: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor,
                token_pos: torch.Tensor, extra: torch.Tensor, prev: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        x = self.inputs(layer, history, experts, weights, token_pos, extra, prev, token)
        return self.core(x[0], x[1], x[2], x[3], x[4], x[5], x[6], x[7], x[8])

    @torch.jit.export
    def predict_horizons(self, layer: torch.Tensor, history: torch.Tensor, experts: torch.Tensor,
                         weights: torch.Tensor, token_pos: torch.Tensor, extra: torch.Tensor, prev: torch.Tensor,
                         token: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k experts at layer l + d for every horizon d, best first ([N, horizons, k]), and their
        probabilities (softmax over all, per horizon)."""
        x = self.inputs(layer, history, experts, weights, token_pos, extra, prev, token)
        every = self.every
        if every is not None:
            logits = every(x[0], x[1], x[2], x[3], x[4], x[5], x[6], x[7], x[8])
        else:
            logits = self.core(x[0], x[1], x[2], x[3], x[4], x[5], x[6], x[7], x[8]).unsqueeze(1)
        scores, best = torch.softmax(logits, dim=2).topk(k, dim=2)
        return best, scores

    def inputs(self, layer: torch.Tensor, history: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor,
               token_pos: torch.Tensor, extra: torch.Tensor, prev: torch.Tensor, token: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                          torch.Tensor, torch.Tensor, torch.Tensor]:
        """The raw state as the kind's inputs (routecast.data.batches.Inputs' order)."""
        layer = layer.long()
        history = history.long()
        if history.shape[1] < self.history_len:
            history = F.pad(history, (0, self.history_len - history.shape[1]), value=-1.0)
        hist = torch.where(self.slot <= layer.unsqueeze(1), history[:, : self.history_len] + 1, 0).clamp(min=0)
        primary = experts[:, 0].long()
        if self.top_k > 1:
            secondary = experts[:, 1].long() + 1
        else:
            secondary = torch.zeros_like(primary)
        position = torch.clamp(token_pos.float() / self.position_scale, max=1.0)
        return (layer, primary, secondary, hist, weights.float(), position, (prev.long() + 1).clamp(min=0),
                extra.float(), token.long())

    @torch.jit.export
    def predict(self, layer: torch.Tensor, history: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor,
                token_pos: torch.Tensor, extra: torch.Tensor, prev: torch.Tensor, token: torch.Tensor,
                k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k experts at the next layer, best first, and their probabilities (softmax over all)."""
        probs = torch.softmax(self.forward(layer, history, experts, weights, token_pos, extra, prev, token), dim=1)
        scores, best = probs.topk(k, dim=1)
        return best, scores


def _as_tensor(value: Any, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value if value.dtype == dtype else value.to(dtype)
    # Writable too: torch warns on a read-only array (one read from Parquet); copied only if it is not.
    return torch.from_numpy(np.require(value, requirements=("C", "W"))).to(dtype)


class Predictor:
    """Predict the next layer's experts from the current routing state (see the module doc)."""

    def __init__(self, module: Any, info: dict[str, Any]) -> None:
        self.module = module
        self.info = info  # _INFO, position_scale (and `sequences`: a kind that reads the sequence so far)
        self._empty: dict[tuple[int, int], torch.Tensor] = {}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_model(cls, model: nn.Module, position_scale: float = POSITION_SCALE) -> Predictor:
        config = model.config
        if hasattr(model, "predict_samples"):  # a kind that reads the sequence so far (context)
            from routecast.predictors.context.model import ContextEngine

            info = {name: getattr(config, name) for name in _INFO if name not in ("reads_token", "horizons")}
            return cls(ContextEngine(model), info | {"reads_token": config.reads_token, "sequences": True,
                                                     "horizons": list(config.horizons),
                                                     "position_scale": float(position_scale), "window": config.window})
        core = registry.get(config.kind).serve(model.eval())
        engine = EngineModule(core, config, position_scale).eval()
        return cls(engine, _info(engine))

    @classmethod
    def load(cls, path: str | Path, position_scale: float | None = None) -> Predictor:
        """A train_full checkpoint (`.pt`), or an export written by `export` (`.pt2`, `.ts`)."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: not found")
        if path.suffix == ".pt2":
            extra_files = {"routecast.json": ""}
            program = torch.export.load(str(path), extra_files=extra_files)
            info = json.loads(extra_files["routecast.json"])
            return cls(_ExportedModule(program.module()), info)
        if _is_torchscript(path):
            extra_files = {"routecast.json": ""}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra_files).eval()
            return cls(module, json.loads(extra_files["routecast.json"]))
        model, checkpoint = load_checkpoint(path)
        scale = position_scale or float(checkpoint.get("position_scale", POSITION_SCALE))
        return cls.from_model(model, scale)

    def export(self, path: str | Path) -> Path:
        """Write the predictor for an engine; the suffix picks the format: `.pt2` (torch.export) or
        `.ts` (TorchScript). Either loads back with `Predictor.load(path)`, or with torch alone."""
        path = Path(path)
        if path.suffix not in (".pt2", ".ts"):
            raise InputError(f"{path}: export to .pt2 (torch.export) or .ts (TorchScript)")
        if not isinstance(self.module, nn.Module) or isinstance(self.module, torch.jit.ScriptModule):
            raise InputError("export from a checkpoint-built Predictor (Predictor.load of a .pt)")
        if self.info.get("sequences") and path.suffix == ".ts":
            raise InputError(f"{path}: the context kind exports to .pt2 only (TorchScript does not compile its "
                             f"transformer)")
        info = {"routecast.json": json.dumps(self.info)}
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            if path.suffix == ".pt2":
                program = _export_context(self.module) if self.info.get("sequences") else _export_program(self.module)
                torch.export.save(program, fh, extra_files=info)
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.13 steers to torch.export
                    torch.jit.save(torch.jit.script(self.module), fh, _extra_files=info)
        return path

    # ------------------------------------------------------------------ calls
    @property
    def top_k(self) -> int:
        return int(self.info["top_k"])

    @torch.inference_mode()
    def logits(self, layer: Any, history: Any, experts: Any, weights: Any, token_pos: Any, extra: Any = None,
               prev: Any = None, token: Any = None) -> torch.Tensor:
        """Logits [N, num_experts] for the expert at the next layer."""
        self._per_call("give one layer's logits")
        return self.module(*self._args(layer, history, experts, weights, token_pos, extra, prev, token))

    @torch.inference_mode()
    def predict(self, layer: Any, history: Any, experts: Any, weights: Any, token_pos: Any, extra: Any = None,
                prev: Any = None, k: int | None = None, token: Any = None) -> Prediction:
        """The k (default top_k) experts expected at the next layer, best first, with probabilities.

        layer [N] int: the layer l that just routed each token; history [N, <=H] int: its primary
        expert at layers 0..l (-1 = unknown; columns past l are ignored); experts [N, top_k] int and
        weights [N, top_k] float: the top-k chosen at layer l, best first; token_pos [N] (int or float);
        extra [N, X] float: spec_logits, when the model was trained with them; prev [N, top_k] int: the
        previous token's top-k at layer l + lookahead (-1 = none), when trained with features.prev_token;
        token [N] int: the token's key (its id, or `routecast.data.features.text_keys` of its text; -1 =
        none), when trained with features.token.
        Tensors or NumPy arrays; tensors of the right dtype (int64, float32) skip a conversion.
        """
        self._per_call("predict one layer's call")
        k = k or self.top_k
        if not 1 <= k <= self.info["num_experts"]:
            raise InputError(f"k={k}: must be in [1, num_experts={self.info['num_experts']}]")
        best, scores = self.module.predict(*self._args(layer, history, experts, weights, token_pos, extra, prev, token),
                                           k)
        return Prediction(best, scores)

    @torch.inference_mode()
    def predict_horizons(self, layer: Any, history: Any, experts: Any, weights: Any, token_pos: Any,
                         extra: Any = None, prev: Any = None, k: int | None = None, token: Any = None) -> Prediction:
        """`predict` for every horizon d of `features.horizons` at once (`horizons`): the k experts
        expected at layer l + d, best first, with probabilities, [N, len(horizons), k]; with
        `features.next_token` (`next_token`) one more, last: the next token's experts at layer l.
        One call per layer; a model of one horizon gives [N, 1, k]. Not in a .pt2 export (its
        program is `predict`)."""
        self._per_call("predict one layer's call")
        k = k or self.top_k
        if not 1 <= k <= self.info["num_experts"]:
            raise InputError(f"k={k}: must be in [1, num_experts={self.info['num_experts']}]")
        if not hasattr(self.module, "predict_horizons"):
            raise InputError("a .pt2 export holds `predict` (the first horizon) only: Predictor.load the .pt or "
                             "its .ts export for every horizon")
        args = self._args(layer, history, experts, weights, token_pos, extra, prev, token)
        best, scores = self.module.predict_horizons(*args, k)
        return Prediction(best, scores)

    @torch.inference_mode()
    def predict_next_token(self, layer: Any, history: Any, experts: Any, weights: Any, token_pos: Any,
                           extra: Any = None, prev: Any = None, k: int | None = None, token: Any = None) -> Prediction:
        """The k experts the next token is expected to take at this layer l, best first, with
        probabilities ([N, k]): the last column of `predict_horizons` (the same one call), for an
        engine deciding what to keep resident. Needs a model trained with features.next_token."""
        if not self.next_token:
            raise InputError("this model was not trained with features.next_token: it has no next-token head")
        every = self.predict_horizons(layer, history, experts, weights, token_pos, extra, prev, k, token)
        return Prediction(every.experts[:, -1], every.scores[:, -1])

    @property
    def horizons(self) -> list[int]:
        """The horizons d it predicts (layer l + d), the first being `predict`'s."""
        return [d for d in self.info.get("horizons") or [self.info["lookahead"]] if d != NEXT_TOKEN]

    @property
    def next_token(self) -> bool:
        """Whether it predicts the next token's experts at this layer (features.next_token): the last
        column of `predict_horizons`, `predict_next_token`."""
        return NEXT_TOKEN in (self.info.get("horizons") or [])

    @torch.inference_mode()
    def predict_context(self, route: Any, key: Any = None, k: int | None = None,
                        every_horizon: bool = False) -> Prediction:
        """A kind that reads the sequence so far (`context`), once per layer: the k (default top_k)
        experts expected for the last token of each sequence at every layer l + lookahead, best
        first, with their probabilities ([B, slots, k]; an engine at layer l reads [:, l]).
        `every_horizon`: every target it was trained for, [B, slots, targets, k] (the horizons, then
        the next token; not in a .pt2 export, whose program is the first horizon's).

        route [B, W, num_layers, top_k] int: the experts of each sequence's last W tokens (W <=
        `window`), -1 unknown (the last token's layers past l); key [B, W] int: their token keys
        (ids, or `routecast.data.features.text_keys` of their text; -1 none), needed when the model
        was trained with features.token."""
        if not self.info.get("sequences"):
            raise InputError(f"predict_context is the call of a kind that reads the sequence so far (context); "
                             f"this {self.info.get('kind', 'model')} takes predict(layer, history, ...)")
        k = k or self.top_k
        info = self.info
        if not 1 <= k <= info["num_experts"]:
            raise InputError(f"k={k}: must be in [1, num_experts={info['num_experts']}]")
        route = _as_tensor(route, torch.int64)
        _check_shape("route", route, (None, None, info["num_layers"], info["top_k"]))
        B, W = route.shape[0], route.shape[1]
        if not 1 <= W <= info["window"]:
            raise InputError(f"route holds {W} tokens a sequence: the model reads 1 to window={info['window']}")
        _check_range("route", route, -1, info["num_experts"] - 1)
        if key is None:
            if info.get("reads_token"):
                raise InputError("this model was trained with features.token: pass key, each token's key (its id, "
                                 "or routecast.data.features.text_keys of its text; -1: none)")
            key = torch.full((B, W), -1, dtype=torch.int64)
        key = _as_tensor(key, torch.int64)
        _check_shape("key", key, (B, W))
        if every_horizon:
            if not hasattr(self.module, "predict_horizons"):
                raise InputError("a .pt2 export holds the first horizon only: Predictor.load the .pt for every target")
            best, scores = self.module.predict_horizons(route, key, k)
        else:
            best, scores = self.module.predict(route, key, k)
        return Prediction(best, scores)

    def predict_features(self, feats: Features, k: int | None = None, every_horizon: bool = False) -> Prediction:
        """Offline: predict for encoded samples (the evaluate stage's inputs; for a kind that reads
        the sequence so far, whole sequences in order, as every split keeps them, from its checkpoint);
        `every_horizon`: `predict_horizons`' [N, horizons, k]."""
        if self.info.get("sequences"):
            k = k or self.top_k
            if not isinstance(self.module, nn.Module) or not hasattr(self.module, "core"):
                raise InputError("predict_features of a context model reads its windows from the checkpoint: "
                                 "Predictor.load the .pt (an export takes predict_context)")
            probs = torch.softmax(self.module.core.predict_samples(feats), dim=1)
            scores, best = probs.topk(k, dim=1)
            return Prediction(best, scores)
        history = feats.history.astype(np.int64) - 1  # stored +1, 0 = padding -> -1 = unknown
        experts = np.zeros((len(feats), feats.meta.top_k), dtype=np.int64)
        experts[:, 0] = feats.primary
        if feats.meta.top_k > 1:
            experts[:, 1] = feats.secondary
        extra = feats.spec_logits if self.info["num_extra"] else None
        prev = feats.prev_experts.astype(np.int64) - 1 if self.info["num_prev"] else None
        # The samples' own position feature, whatever position_scale encoded them.
        token_pos = feats.position.astype(np.float32) * np.float32(self.info["position_scale"])
        token = feats.token if self.info.get("reads_token") else None
        if self.info.get("reads_token") and token is None:
            raise InputError("this model was trained with features.token, but these samples have no token column: "
                             "encode them with features.token: true")
        call = self.predict_horizons if every_horizon else self.predict
        return call(feats.layer, history, experts, feats.gating, token_pos, extra, prev, k, token)

    def _per_call(self, what: str) -> None:
        if self.info.get("sequences"):
            raise InputError(f"this kind reads the sequence so far, which this call does not carry: it cannot {what}; "
                             "call predict_context with the last tokens' routing (or predict_features)")

    def _args(self, layer: Any, history: Any, experts: Any, weights: Any, token_pos: Any, extra: Any,
              prev: Any, token: Any) -> tuple[torch.Tensor, ...]:
        info = self.info
        layer, history = _as_tensor(layer, torch.int64), _as_tensor(history, torch.int64)
        experts, weights = _as_tensor(experts, torch.int64), _as_tensor(weights, torch.float32)
        n, L, E, k = layer.shape[0], info["num_layers"], info["num_experts"], info["top_k"]
        extra = self._optional(extra, n, info["num_extra"], torch.float32, "extra (spec_logits)")
        prev = self._optional(prev, n, info["num_prev"], torch.int64, "prev (the previous token's experts)")
        _check_shape("history", history, (n, None))
        if history.shape[1] > info["history_len"]:
            raise InputError(f"history has {history.shape[1]} columns, the model reads {info['history_len']} layers")
        _check_shape("experts", experts, (n, k))
        _check_shape("weights", weights, (n, k))
        token_pos = _as_tensor(token_pos, torch.float32)
        _check_shape("token_pos", token_pos, (n,))
        _check_range("layer", layer, 0, L - info["lookahead"] - 1)
        _check_range("experts", experts, 0, E - 1)
        _check_range("history", history, -1, E - 1)
        _check_range("prev", prev, -1, E - 1)
        if token is None:
            if info.get("reads_token"):
                raise InputError("this model was trained with features.token: pass token, each token's key (its id, "
                                 "or routecast.data.features.text_keys of its text; -1: none)")
            token = torch.full((n,), -1, dtype=torch.int64)
        else:
            token = _as_tensor(token, torch.int64)
            _check_shape("token", token, (n,))
        return layer, history, experts, weights, token_pos, extra, prev, token

    def _optional(self, value: Any, n: int, width: int, dtype: torch.dtype, what: str) -> torch.Tensor:
        if value is None:
            if width:
                raise InputError(f"this model was trained with {width} columns of {what}: pass them")
            key = (n, 0 if dtype == torch.float32 else 1)
            if key not in self._empty:
                self._empty[key] = torch.zeros((n, 0), dtype=dtype)
            return self._empty[key]
        tensor = _as_tensor(value, dtype)
        _check_shape(what, tensor, (n, width))
        return tensor


def _check_shape(name: str, tensor: torch.Tensor, shape: tuple[int | None, ...]) -> None:
    if tensor.dim() != len(shape) or any(want is not None and got != want for got, want in zip(tensor.shape, shape)):
        raise InputError(f"{name} must have shape [{', '.join('*' if s is None else str(s) for s in shape)}], "
                         f"got {list(tensor.shape)}")


def _check_range(name: str, tensor: torch.Tensor, low: int, high: int) -> None:
    if tensor.numel() and (int(tensor.min()) < low or int(tensor.max()) > high):
        bad = tensor[(tensor < low) | (tensor > high)][0].item()
        raise InputError(f"{name}: {bad} out of range [{low}, {high}]")


_INFO = ("num_layers", "num_experts", "top_k", "history_len", "lookahead", "num_prev", "num_extra", "reads_token",
         "horizons")


def _info(engine: EngineModule) -> dict[str, Any]:
    return {name: getattr(engine, name) for name in (*_INFO, "position_scale")}


def _is_torchscript(path: Path) -> bool:
    """torch.jit.save archives hold a code/ folder; torch.save checkpoints do not."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any("/code/" in name for name in archive.namelist())
    except zipfile.BadZipFile:
        return False


class _PredictAll(nn.Module):
    """EngineModule.predict with k = num_experts (the full ranking; a caller slices its k)."""

    def __init__(self, engine: EngineModule) -> None:
        super().__init__()
        self.engine = engine

    def forward(self, layer: torch.Tensor, history: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor,
                token_pos: torch.Tensor, extra: torch.Tensor, prev: torch.Tensor,
                token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.engine.predict(layer, history, experts, weights, token_pos, extra, prev, token,
                                   self.engine.num_experts)


def _export_program(engine: EngineModule) -> torch.export.ExportedProgram:
    n = 4
    example = (torch.zeros(n, dtype=torch.long), torch.zeros((n, engine.history_len), dtype=torch.long),
               torch.zeros((n, engine.top_k), dtype=torch.long), torch.full((n, engine.top_k), 1.0 / engine.top_k),
               torch.zeros(n), torch.zeros((n, engine.num_extra)),
               torch.zeros((n, engine.num_prev), dtype=torch.long), torch.full((n,), -1, dtype=torch.long))
    batch = torch.export.Dim("batch", min=1, max=1 << 24)
    return torch.export.export(_PredictAll(engine), example, dynamic_shapes=tuple({0: batch} for _ in example))


class _PredictContext(nn.Module):
    """ContextEngine.predict with k = num_experts (the full ranking; a caller slices its k)."""

    def __init__(self, engine: nn.Module) -> None:
        super().__init__()
        self.engine = engine

    def forward(self, route: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.engine.predict(route, key, self.engine.num_experts)


def _export_context(engine: nn.Module) -> torch.export.ExportedProgram:
    """The context kind's engine call with a dynamic batch and a dynamic number of tokens (1 to window)."""
    b, w = 2, max(2, min(4, engine.window))
    example = (torch.full((b, w, engine.num_layers, engine.top_k), -1, dtype=torch.long),
               torch.full((b, w), -1, dtype=torch.long))
    batch = torch.export.Dim("batch", min=1, max=1 << 24)
    tokens = torch.export.Dim("tokens", min=1, max=max(engine.window, 2))
    return torch.export.export(_PredictContext(engine), example,
                               dynamic_shapes=({0: batch, 1: tokens}, {0: batch, 1: tokens}))


class _ExportedModule:
    """A loaded .pt2 program behind the interface Predictor calls (EngineModule's, or ContextEngine's)."""

    def __init__(self, program: Any) -> None:
        self.program = program

    def predict(self, *args: Any) -> tuple[torch.Tensor, torch.Tensor]:
        *inputs, k = args
        best, scores = self.program(*inputs)
        return best[..., :k], scores[..., :k]

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("a .pt2 export returns ranked experts and probabilities, not logits; "
                                  "use predict(), or the .pt checkpoint / a TorchScript export for logits")
