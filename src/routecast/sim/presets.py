"""What `simulate_prefetch` knows of machines and models (docs/prefetch.md#presets gives the public
source of every number).

A preset describes a machine: the GPU memory it gives to expert weights, its host-to-GPU link, the
GPU memory bandwidth decode streams weights at, its host CPU, and the precision its source ran the
weights at. A model gives the sizes of the weights an engine moves and reads. The engine's numbers
follow from both (`engine_numbers`): an expert's MB from the model and the precision, the slots
from the memory, a layer's compute from the bytes it reads and the GPU's bandwidth.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Machine:
    """One offloading setup's hardware (and the precision its source held the weights at)."""

    expert_gb: float  # GPU memory given to routed experts' weights, GB (1e9 bytes)
    link_gb_per_s: float  # effective host-to-GPU bandwidth, GB/s
    gpu_gb_per_s: float  # GPU memory bandwidth batch-1 decode streams weights at (an assumed share of peak)
    cpu_gb_per_s: float | None  # host memory bandwidth a batch-1 expert streams at on the CPU; None: not known
    expert_bits: float  # bits per parameter of the routed experts (16: bf16; 3: mixtral-offloading's HQQ)
    dense_bits: float  # ... of the rest each layer reads (attention, shared experts)


@dataclass(frozen=True)
class ModelShape:
    """One known MoE model's MoE layers, as an offloading engine sees them."""

    num_experts: int
    top_k: int
    num_layers: int  # MoE layers
    expert_params_m: float  # parameters of one routed expert, millions
    dense_params_m: float  # parameters each MoE layer reads besides its routed experts (attention, shared), millions
    names: tuple[str, ...]  # lower-case fragments of a trace's `source` that name the model or its importer


PRESETS: dict[str, Machine] = {
    # An A100 40GB PCIe over PCIe 4.0 x16, Mixtral-8x7B in bf16; the host one socket of a DGX A100 (AMD EPYC
    # 7742: 8 channels of DDR4-3200, 204.8 GB/s peak).
    "mixtral_bf16_pcie4": Machine(expert_gb=37.9, link_gb_per_s=25.0, gpu_gb_per_s=0.75 * 1555,
                                  cpu_gb_per_s=204.8, expert_bits=16, dense_bits=16),
    # A 16 GB PCIe 4.0 x16 card (RTX 4080) running mixtral-offloading's setting: 2-bit HQQ experts (groups of 16;
    # 2.6 bits per parameter with scales and zeros, the paper's figure), 4-bit attention (4.5 bits), 4 of each
    # layer's 8 experts on the GPU (7.33 GB); the host a desktop's dual-channel DDR5-5600 (89.6 GB/s peak).
    "mixtral_3bit_pcie4": Machine(expert_gb=7.33, link_gb_per_s=25.0, gpu_gb_per_s=0.75 * 717,
                                  cpu_gb_per_s=89.6, expert_bits=2.6, dense_bits=4.5),
    # mixtral-offloading's own demo and its paper's Table 2: the same weights on a Colab T4 (16 GB, PCIe 3.0 x16),
    # 4 experts per layer cached; the host a Colab VM, whose memory bandwidth is not published.
    "mixtral_3bit_t4": Machine(expert_gb=7.33, link_gb_per_s=12.0, gpu_gb_per_s=0.75 * 320,
                               cpu_gb_per_s=None, expert_bits=2.6, dense_bits=4.5),
    # Fiddler's first machine: a Quadro RTX 6000 (24 GB, 672 GB/s, PCIe 3.0 x16), Mixtral-8x7B in bf16 with 56
    # of its 256 experts on the GPU; two Xeon Gold 6126 (6 channels of DDR4-2666 each: 128 GB/s per socket).
    "fiddler_rtx6000_bf16": Machine(expert_gb=19.74, link_gb_per_s=12.0, gpu_gb_per_s=0.75 * 672,
                                    cpu_gb_per_s=128.0, expert_bits=16, dense_bits=16),
    # The RTX 4080 with DeepSeek-V2-Lite in int8 (as the shared log ran), 10% of the experts cached (MoE-Beyond).
    "deepseek_v2_lite_int8_pcie4": Machine(expert_gb=1.35, link_gb_per_s=25.0,
                                           gpu_gb_per_s=0.75 * 717, cpu_gb_per_s=89.6, expert_bits=8, dense_bits=8),
}

MODELS: dict[str, ModelShape] = {
    # hidden 4096, expert FFN 14336 (w1, w2, w3); attention 4096 x (4096 + 1024 + 1024 + 4096)
    "mixtral_8x7b": ModelShape(num_experts=8, top_k=2, num_layers=32, expert_params_m=3 * 4096 * 14336 / 1e6,
                               dense_params_m=4096 * 10240 / 1e6, names=("mixtral",)),
    # hidden 2048, expert FFN 1408; MLA attention 13.76M; 2 shared experts every token reads
    "deepseek_v2_lite": ModelShape(num_experts=64, top_k=6, num_layers=26, expert_params_m=3 * 2048 * 1408 / 1e6,
                                   dense_params_m=(2048 * 3072 + 2048 * 576 + 512 * 4096 + 2048 * 2048
                                                   + 2 * 3 * 2048 * 1408) / 1e6,
                                   names=("deepseek-v2-lite", "deepseek_v2_lite", "import:deepseek_csv")),
    # FLAME-MoE-290M (cmu-flame/FLAME-MoE, scripts/release/flame-moe-290m.sh and configs/model/flame-moe.sh): hidden
    # 1024, expert FFN 704, 64 experts, top-6, one shared expert of FFN 1408, 16 heads; 8 MoE layers
    "flame_moe_290m": ModelShape(num_experts=64, top_k=6, num_layers=8, expert_params_m=3 * 1024 * 704 / 1e6,
                                 dense_params_m=(4 * 1024 * 1024 + 3 * 1024 * 1408) / 1e6,
                                 names=("flame", "import:flame_csv")),
}


@dataclass(frozen=True)
class EngineNumbers:
    """The engine's numbers for one (machine, model): what the replay needs."""

    expert_mb: float  # one routed expert's weights, MB
    gb_per_s: float  # the link
    ms_per_layer: float  # one MoE layer's decode compute, its experts resident
    slots_per_layer: int  # experts of each layer the GPU holds
    cpu_ms: float  # one expert computed on the host CPU (0: no fallback)
    slots_total: int = 0  # > 0: one cache of this many experts for every layer (cache.scope: model)
    miss_fraction: float = 1.0  # the share of an expert's bytes a demand fetch moves (miss_bits / expert_bits)


def find_model(source: str, num_experts: int, top_k: int) -> str | None:
    """The known model a trace comes from: by its `source` (a model name or an importer), else by its shape."""
    lowered = source.lower()
    for name, model in MODELS.items():
        if any(fragment in lowered for fragment in model.names):
            return name
    for name, model in MODELS.items():
        if (model.num_experts, model.top_k) == (num_experts, top_k):
            return name
    return None


def expert_mb(model: ModelShape, bits: float) -> float:
    return model.expert_params_m * bits / 8


def layer_mb(model: ModelShape, top_k: int, expert_bits: float, dense_bits: float) -> float:
    """The weights one MoE layer reads per decoded token: the rest of the layer and its top-k experts."""
    return model.dense_params_m * dense_bits / 8 + top_k * expert_mb(model, expert_bits)


def slots_from_memory(expert_gb: float, one_expert_mb: float, num_layers: int, num_experts: int) -> int:
    """Experts of each layer that `expert_gb` holds (every layer alike), at most every expert."""
    return min(math.floor(expert_gb * 1000 / one_expert_mb / num_layers), num_experts)
