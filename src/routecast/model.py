"""The seed's MLP: embeddings for layer and experts, then Linear-BatchNorm-LeakyReLU-Dropout blocks.

Input = concat(layer emb, secondary emb, flattened history embs, gating, position[, extra]):
239 wide for emb 5/7 and 32 layers, 178 for 10/5. The expert embedding has row 0 for padding,
shared by `secondary` (+1) and every `history` entry (already +1).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from routecast.artifacts import save_torch
from routecast.features import FeatureMeta, Features
from routecast.params import ModelParams


@dataclass(frozen=True)
class ModelConfig:
    num_layers: int
    num_experts: int
    top_k: int
    history_len: int
    layer_emb: int
    expert_emb: int
    architecture: list[int] = field(default_factory=list)
    dropout: float = 0.0
    num_extra: int = 0  # width of optional extra features (spec_logits)

    @classmethod
    def build(cls, meta: FeatureMeta, params: ModelParams, num_extra: int = 0) -> ModelConfig:
        return cls(meta.num_layers, meta.num_experts, meta.top_k, meta.history_len, params.layer_emb,
                   params.expert_emb, list(params.architecture), params.dropout, num_extra)

    @property
    def input_width(self) -> int:
        return (self.layer_emb + self.expert_emb * (1 + self.history_len) + self.top_k + 1 + self.num_extra)


class Inputs(NamedTuple):
    """Model inputs as tensors (a batch is a slice of each)."""

    layer: torch.Tensor  # int64 [N]
    secondary: torch.Tensor  # int64 [N], +1 (0 = none)
    history: torch.Tensor  # int64 [N, H], +1 (0 = padding)
    gating: torch.Tensor  # float32 [N, k]
    position: torch.Tensor  # float32 [N]
    extra: torch.Tensor  # float32 [N, X] (X may be 0)

    def __len__(self) -> int:
        return len(self.layer)

    def index(self, idx: torch.Tensor | slice) -> Inputs:
        return Inputs(*(t[idx] for t in self))


def to_inputs(feats: Features, use_extra: bool) -> Inputs:
    extra = feats.spec_logits if (use_extra and feats.spec_logits is not None) else np.zeros((len(feats), 0), np.float32)
    return Inputs(
        layer=torch.from_numpy(feats.layer.astype(np.int64)),
        secondary=torch.from_numpy(feats.secondary.astype(np.int64) + 1),
        history=torch.from_numpy(feats.history.astype(np.int64)),
        gating=torch.from_numpy(np.array(feats.gating, dtype=np.float32)),
        position=torch.from_numpy(feats.position.astype(np.float32)),
        extra=torch.from_numpy(np.array(extra, dtype=np.float32)),
    )


class SeededDropout(nn.Dropout):
    """nn.Dropout whose masks are 16-bit lanes of a NumPy SFC64 stream's raw 64-bit output.

    torch's CPU dropout draws one mt19937 number per element and costs more than the block's
    matmul at the seed's shapes. `Generator.integers` plus `np.where` cost ~1 ms per [512, 512]
    mask; raw 64-bit words viewed as int16, then one vectorised compare, cost about a quarter
    (training steps 5 to 9% faster: benchmarks/bench_dropout.py). The drop rate is p to within 2**-17.
    Eval mode is the identity, as for nn.Dropout, and there is no state to save.
    """

    def __init__(self, p: float = 0.5) -> None:
        super().__init__(p)
        self.reseed(0)

    def reseed(self, seed: int) -> None:
        self._bits = np.random.SFC64(seed)

    def mask(self, shape: torch.Size) -> torch.Tensor:
        """float32 mask of `shape`: 0 (dropped) or 1 / (1 - p) (kept)."""
        n = int(np.prod(shape))
        draws = self._bits.random_raw(-(-n // 4)).view(np.int16)[:n]  # 4 uniform int16 per word
        threshold = round(self.p * 65536) - 32768  # keep a draw >= threshold: P = 1 - p (to 2**-17)
        # NumPy's compare and bool -> float32 cast are vectorised; torch's, on int16 and bool, are
        # ~4x slower here.
        mask = np.greater_equal(draws.reshape(shape), threshold).astype(np.float32)
        mask *= np.float32(1.0 / (1.0 - self.p))
        return torch.from_numpy(mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.p >= 1.0:
            return x * 0.0
        return x * self.mask(x.shape)


class RoutePredictor(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.layer_emb = nn.Embedding(config.num_layers, config.layer_emb)
        self.expert_emb = nn.Embedding(config.num_experts + 1, config.expert_emb, padding_idx=0)
        blocks: list[nn.Module] = []
        width = config.input_width
        for units in config.architecture:
            blocks += [nn.Linear(width, units), nn.BatchNorm1d(units), nn.LeakyReLU(0.1, inplace=True),
                       SeededDropout(config.dropout)]
            width = units
        blocks.append(nn.Linear(width, config.num_experts))
        self.mlp = nn.Sequential(*blocks)
        # Seed the dropout streams from torch's RNG after every weight is drawn, so the initial
        # weights are those of plain nn modules and torch.manual_seed(s) fixes the whole run.
        for module in self.mlp:
            if isinstance(module, SeededDropout):
                module.reseed(int(torch.randint(0, 2**62, ()).item()))

    def forward(self, layer: torch.Tensor, secondary: torch.Tensor, history: torch.Tensor, gating: torch.Tensor,
                position: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        """Logits [N, num_experts] for the next layer's primary expert."""
        # One lookup for secondary and history (adjacent in the input): one gather and one
        # gradient scatter per step instead of two.
        experts = self.expert_emb(torch.cat([secondary.unsqueeze(1), history], dim=1)).flatten(1)
        x = torch.cat(
            [
                self.layer_emb(layer),
                experts,
                gating,
                position.unsqueeze(1),
                extra,
            ],
            dim=1,
        )
        return self.mlp(x)


@torch.no_grad()
def predict_logits(model: RoutePredictor, inputs: Inputs, batch_size: int = 8192) -> torch.Tensor:
    model.eval()
    out = [model(*inputs.index(slice(i, i + batch_size))) for i in range(0, len(inputs), batch_size)]
    return torch.cat(out) if out else torch.zeros((0, model.config.num_experts))


def save_model(path: str | Path, model: RoutePredictor, extra: dict[str, Any] | None = None) -> None:
    """Weights plus the config that built them; loadable with torch.load(weights_only=True)."""
    save_torch(path, {"config": asdict(model.config), "state_dict": model.state_dict(), **(extra or {})})


def load_model(path: str | Path) -> tuple[RoutePredictor, dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found (run train_full first: dvc repro)")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    model = RoutePredictor(ModelConfig(**checkpoint["config"]))
    model.load_state_dict(checkpoint["state_dict"])
    model.eval()
    return model, checkpoint
