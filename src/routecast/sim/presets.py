"""Hardware presets of the offloading engine `simulate_prefetch` replays (docs/prefetch.md#presets
gives the public source of each)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HardwarePreset:
    """The numbers of one offloading setup (docs/prefetch.md#presets gives the public source of each)."""

    expert_mb: float  # one expert's weights, MB (1e6 bytes)
    gb_per_s: float  # effective host-to-GPU bandwidth, GB/s (1e9 bytes per second)
    ms_per_layer: float  # decode compute of one MoE layer at batch 1, its experts resident
    slots_per_layer: int  # experts of each MoE layer the GPU memory holds


PRESETS: dict[str, HardwarePreset] = {
    # Mixtral-8x7B's bf16 experts (3 x 4096 x 14336 x 2 bytes) on an A100 40GB PCIe, over PCIe 4.0 x16.
    "mixtral_bf16_pcie4": HardwarePreset(expert_mb=352.321536, gb_per_s=25.0, ms_per_layer=0.68, slots_per_layer=3),
    # The same experts at ~3 bits (mixtral-offloading's HQQ setting) on a 16 GB PCIe 4.0 x16 GPU (RTX 4080).
    "mixtral_3bit_pcie4": HardwarePreset(expert_mb=66.060288, gb_per_s=25.0, ms_per_layer=0.29, slots_per_layer=4),
    # mixtral-offloading's own demo: the ~3-bit experts on a Colab T4 (16 GB, PCIe 3.0 x16).
    "mixtral_3bit_t4": HardwarePreset(expert_mb=66.060288, gb_per_s=12.0, ms_per_layer=0.64, slots_per_layer=4),
    # DeepSeek-V2-Lite's int8 experts (3 x 2048 x 1408 bytes; the shared DeepSeek log ran in 8-bit) on a
    # 16 GB PCIe 4.0 x16 GPU (RTX 4080), 10% of each layer's 64 experts cached (MoE-Beyond's setting).
    "deepseek_v2_lite_int8_pcie4": HardwarePreset(expert_mb=8.650752, gb_per_s=25.0, ms_per_layer=0.15,
                                                  slots_per_layer=6),
}
