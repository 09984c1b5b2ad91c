"""The trained model as a predictor an inference engine calls once per MoE layer.

    from routecast import Predictor
    predictor = Predictor.load("data/models/tuned.pt")          # a train_full checkpoint
    experts, scores = predictor.predict(layer, history, experts_now, weights_now, token_pos)
    predictor.export("tuned.ts")                                 # TorchScript, for engines
    predictor = Predictor.load("tuned.ts")                       # the export, without the checkpoint

The call takes the routing state of a batch of tokens once layer `l` has routed them and returns
the top-k experts expected at layer `l + lookahead`, best first, with their probabilities.

Inference runs a fused form of the eval-mode MLP (`FusedRoutePredictor`), not the training
module: BatchNorm is folded into the Linear before it, and every embedding is multiplied through
the first Linear, so the first layer becomes one `embedding_bag` (a gather-and-sum of 2 + H
precomputed rows) plus one small matmul for the gate weights, position and extras. Its logits equal
the eager model's to float32 rounding (the tests hold them to 1e-4 absolute).

The export is TorchScript: it loads with `torch.jit.load` in Python or libtorch (C++) without
this package, needs no dependency beyond torch, and the fused module is plain tensor code that
scripts as is. ONNX would suit non-torch runtimes but needs onnx/onnxscript to write and
onnxruntime to run; engines that prefetch experts (vLLM, SGLang, llama.cpp's Python side) already
run torch.
"""

from __future__ import annotations

import json
import warnings
import zipfile
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from routecast.features import Features
from routecast.model import RoutePredictor, load_model

DEFAULT_POSITION_SCALE = 2048.0


class Prediction(NamedTuple):
    experts: torch.Tensor  # int64 [N, k], best first
    scores: torch.Tensor  # float32 [N, k], their probabilities


class FusedRoutePredictor(nn.Module):
    """The eval-mode RoutePredictor as embedding_bag + (Linear with BatchNorm folded) + LeakyReLU.

    forward(layer [N], history [N, H] (expert ids at layers 0..H-1, -1 = unknown; entries past
    `layer` are ignored), experts [N, k] (the top-k at `layer`, best first), weights [N, k],
    token_pos [N], extra [N, X]) -> logits [N, num_experts].
    """

    def __init__(self, model: RoutePredictor, position_scale: float) -> None:
        super().__init__()
        c = model.config
        L, E, H, k, X = c.num_layers, c.num_experts, c.history_len, c.top_k, c.num_extra
        self.num_layers, self.num_experts, self.history_len, self.top_k, self.num_extra = L, E, H, k, X
        self.position_scale = float(position_scale)
        linears = [m for m in model.mlp if isinstance(m, nn.Linear)]
        norms = [m for m in model.mlp if isinstance(m, nn.BatchNorm1d)]
        slopes = {m.negative_slope for m in model.mlp if isinstance(m, nn.LeakyReLU)}
        assert len(linears) == len(norms) + 1 and len(slopes) <= 1
        self.negative_slope = float(slopes.pop()) if slopes else 0.01
        with torch.no_grad():
            folded = [_fold(lin, bn) for lin, bn in zip(linears, norms)] + [
                (linears[-1].weight.double(), linears[-1].bias.double())]
            w1, b1 = folded[0]  # [U, input_width]
            layer_emb, expert_emb = model.layer_emb.weight.double(), model.expert_emb.weight.double()
            # Column blocks of the first Linear, in the order RoutePredictor.forward concatenates them.
            widths = [c.layer_emb, c.expert_emb] + [c.expert_emb] * H + [k, 1, X]
            blocks = torch.split(w1, widths, dim=1)
            rows = [layer_emb @ blocks[0].T, expert_emb @ blocks[1].T]  # [L, U], [E+1, U]
            rows += [expert_emb @ blocks[2 + j].T for j in range(H)]  # H x [E+1, U]
            table = torch.cat(rows).float()
            dense = torch.cat([blocks[2 + H], blocks[3 + H], blocks[4 + H]], dim=1).T  # gating, position, extra
        self.register_buffer("table", table)
        self.register_buffer("dense_weight", dense.float().contiguous())  # [k + 1 + X, U]
        self.register_buffer("bias", b1.float())
        self.hidden = nn.ModuleList()
        for w, b in folded[1:]:
            lin = nn.Linear(w.shape[1], w.shape[0])
            lin.weight.data, lin.bias.data = w.float().contiguous(), b.float()
            lin.requires_grad_(False)
            self.hidden.append(lin)
        # Row offsets into `table` for each bag entry of a token: layer, secondary, history slots.
        self.register_buffer("hist_offset", (L + E + 1 + torch.arange(H) * (E + 1)).unsqueeze(0))
        self.register_buffer("hist_slot", torch.arange(H).unsqueeze(0))
        self.secondary_offset = L

    def forward(self, layer: torch.Tensor, history: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor,
                token_pos: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        n = layer.shape[0]
        layer = layer.long()
        history = history.long()
        if history.shape[1] < self.history_len:
            history = F.pad(history, (0, self.history_len - history.shape[1]), value=-1.0)
        # +1 encoding (0 = padding), and padding past the current layer: the model's history feature.
        hist = torch.where(self.hist_slot <= layer.unsqueeze(1), history[:, : self.history_len] + 1, 0).clamp_(min=0)
        if self.top_k > 1:
            secondary = experts[:, 1:2].long() + (self.secondary_offset + 1)
        else:
            secondary = torch.full((n, 1), self.secondary_offset, dtype=torch.long, device=layer.device)
        position = torch.clamp(token_pos.float() / self.position_scale, max=1.0).unsqueeze(1)
        index = torch.cat([layer.unsqueeze(1), secondary, hist + self.hist_offset], 1)
        dense = torch.cat([weights.float(), position, extra.float()], 1)
        x = torch.addmm(self.bias, dense, self.dense_weight) + F.embedding_bag(index, self.table, mode="sum")
        for lin in self.hidden:
            x = F.leaky_relu(x, self.negative_slope)
            x = lin(x)
        return x

    @torch.jit.export
    def predict(self, layer: torch.Tensor, history: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor,
                token_pos: torch.Tensor, extra: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k experts at the next layer, best first, and their probabilities (softmax over all)."""
        probs = torch.softmax(self.forward(layer, history, experts, weights, token_pos, extra), dim=1)
        scores, best = probs.topk(k, dim=1)
        return best, scores


def _fold(linear: nn.Linear, norm: nn.BatchNorm1d) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear followed by eval-mode BatchNorm as one Linear (float64 while folding)."""
    scale = norm.weight.double() / torch.sqrt(norm.running_var.double() + norm.eps)
    weight = linear.weight.double() * scale[:, None]
    bias = (linear.bias.double() - norm.running_mean.double()) * scale + norm.bias.double()
    return weight, bias


def _as_tensor(value: Any, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value if value.dtype == dtype else value.to(dtype)
    return torch.from_numpy(np.ascontiguousarray(value)).to(dtype)


class Predictor:
    """Predict the next layer's experts from the current routing state (see the module doc)."""

    def __init__(self, module: nn.Module | torch.jit.ScriptModule, top_k: int, num_extra: int) -> None:
        self.module = module
        self.top_k = top_k
        self.num_extra = num_extra
        self._no_extra: dict[int, torch.Tensor] = {}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_model(cls, model: RoutePredictor, position_scale: float = DEFAULT_POSITION_SCALE) -> Predictor:
        fused = FusedRoutePredictor(model, position_scale).eval()
        return cls(fused, model.config.top_k, model.config.num_extra)

    @classmethod
    def load(cls, path: str | Path, position_scale: float | None = None) -> Predictor:
        """A train_full checkpoint (`.pt`) or a TorchScript file written by `export`."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: not found")
        if path.suffix == ".pt2":
            extra_files = {"routecast.json": ""}
            program = torch.export.load(str(path), extra_files=extra_files)
            info = json.loads(extra_files["routecast.json"])
            return cls(_ExportedModule(program.module(), info["position_scale"]), info["top_k"], info["num_extra"])
        if _is_torchscript(path):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                module = torch.jit.load(str(path), map_location="cpu").eval()
            return cls(module, int(module.top_k), int(module.num_extra))
        model, checkpoint = load_model(path)
        scale = position_scale or float(checkpoint.get("position_scale", DEFAULT_POSITION_SCALE))
        return cls.from_model(model, scale)

    def export(self, path: str | Path) -> Path:
        """Write the fused predictor for an engine; the suffix picks the format.

        `.pt2`: torch.export (an ExportedProgram, batch size dynamic; `torch.export.load(path).module()`
        runs it, AOTInductor can compile it for C++). Anything else: TorchScript
        (`torch.jit.load(path).predict(...)` in Python or libtorch, no routecast needed).
        Either loads back with `Predictor.load(path)`.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        if path.suffix == ".pt2":
            if not isinstance(self.module, FusedRoutePredictor):
                raise ValueError("export to .pt2 from a checkpoint-built Predictor (Predictor.load of a .pt)")
            program = _export_program(self.module, self.module.num_experts)  # the full ranking; predict slices k
            info = {"top_k": self.top_k, "num_extra": self.num_extra, "position_scale": self.module.position_scale}
            torch.export.save(program, str(tmp), extra_files={"routecast.json": json.dumps(info)})
        else:
            module = self.module if isinstance(self.module, torch.jit.ScriptModule) else torch.jit.script(self.module)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.13 steers to torch.export
                torch.jit.save(module, str(tmp))
        tmp.replace(path)
        return path

    # ------------------------------------------------------------------ calls
    @torch.inference_mode()
    def logits(self, layer: Any, history: Any, experts: Any, weights: Any, token_pos: Any,
               extra: Any = None) -> torch.Tensor:
        """Logits [N, num_experts] for the expert at the next layer."""
        args = self._args(layer, history, experts, weights, token_pos, extra)
        return self.module(*args)

    @torch.inference_mode()
    def predict(self, layer: Any, history: Any, experts: Any, weights: Any, token_pos: Any, extra: Any = None,
                k: int | None = None) -> Prediction:
        """The k (default top_k) experts expected at the next layer, best first, with probabilities.

        layer [N] int: the layer l that just routed each token; history [N, <=H] int: its primary
        expert at layers 0..l (-1 = unknown; columns past l are ignored); experts [N, top_k] int and
        weights [N, top_k] float: the top-k chosen at layer l, best first; token_pos [N] (int or float);
        extra [N, X] float: spec_logits, when the model was trained with them.
        Tensors or NumPy arrays; tensors of the right dtype (int64, float32) skip a conversion.
        """
        best, scores = self.module.predict(*self._args(layer, history, experts, weights, token_pos, extra),
                                           k or self.top_k)
        return Prediction(best, scores)

    def predict_features(self, feats: Features, k: int | None = None) -> Prediction:
        """Offline: predict for encoded samples (the evaluate stage's inputs)."""
        history = feats.history.astype(np.int64) - 1  # stored +1, 0 = padding -> -1 = unknown
        experts = np.zeros((len(feats), feats.meta.top_k), dtype=np.int64)
        if feats.meta.top_k > 1:
            experts[:, 1] = feats.secondary
        extra = feats.spec_logits if self.num_extra else None
        # The samples' own position feature, whatever position_scale encoded them.
        token_pos = feats.position.astype(np.float32) * np.float32(self.module.position_scale)
        return self.predict(feats.layer, history, experts, feats.gating, token_pos, extra, k)

    def _args(self, layer: Any, history: Any, experts: Any, weights: Any, token_pos: Any,
              extra: Any) -> tuple[torch.Tensor, ...]:
        layer = _as_tensor(layer, torch.int64)
        if extra is None:
            if self.num_extra:
                raise ValueError(f"this model was trained with {self.num_extra} extra features (spec_logits): pass extra")
            n = layer.shape[0]
            extra = self._no_extra.get(n)
            if extra is None:
                extra = self._no_extra.setdefault(n, torch.zeros((n, 0)))
        return (layer, _as_tensor(history, torch.int64), _as_tensor(experts, torch.int64),
                _as_tensor(weights, torch.float32), _as_tensor(token_pos, torch.float32),
                _as_tensor(extra, torch.float32))


def _is_torchscript(path: Path) -> bool:
    """torch.jit.save archives hold a code/ folder; torch.save checkpoints do not."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any("/code/" in name for name in archive.namelist())
    except zipfile.BadZipFile:
        return False


class _PredictTopK(nn.Module):
    """FusedRoutePredictor.predict with k fixed, as the forward torch.export traces."""

    def __init__(self, fused: FusedRoutePredictor, k: int) -> None:
        super().__init__()
        self.fused, self.k = fused, k

    def forward(self, layer: torch.Tensor, history: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor,
                token_pos: torch.Tensor, extra: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fused.predict(layer, history, experts, weights, token_pos, extra, self.k)


def _export_program(fused: FusedRoutePredictor, k: int) -> torch.export.ExportedProgram:
    n = 4
    example = (torch.zeros(n, dtype=torch.long), torch.zeros((n, fused.history_len), dtype=torch.long),
               torch.zeros((n, fused.top_k), dtype=torch.long), torch.full((n, fused.top_k), 1.0 / fused.top_k),
               torch.zeros(n), torch.zeros((n, fused.num_extra)))
    batch = torch.export.Dim("batch", min=1, max=1 << 24)
    return torch.export.export(_PredictTopK(fused, k), example, dynamic_shapes=tuple({0: batch} for _ in example))


class _ExportedModule:
    """A loaded .pt2 program behind the FusedRoutePredictor interface Predictor calls (k fixed at export)."""

    def __init__(self, module: Any, position_scale: float) -> None:
        self.program, self.position_scale = module, position_scale

    def predict(self, layer: torch.Tensor, history: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor,
                token_pos: torch.Tensor, extra: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        best, scores = self.program(layer, history, experts, weights, token_pos, extra)
        return best[:, :k], scores[:, :k]

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("a .pt2 export returns top-k experts and probabilities, not logits; "
                                  "use predict(), or the .pt checkpoint / a TorchScript export for logits")
