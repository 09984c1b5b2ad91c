"""routecast: learn to predict Mixture-of-Experts routing from traces."""

import os

__version__ = "0.1.0"

# Same params, same metrics, on any x86 CPU with AVX2: torch's own kernels, MKL and oneDNN each pick
# their code path by CPU (AVX-512 here, AVX2 there), and the paths round float sums differently, so a
# model trained on one CPU differs in its last digits from one trained on another. Pinning them to
# AVX2 before torch loads makes training bit-identical across such CPUs (ROUTECAST_NATIVE_ISA=1 lets
# each pick its fastest path instead). The cost is measured in docs/performance.md.
if os.environ.get("ROUTECAST_NATIVE_ISA") != "1":
    for _name, _value in (("ATEN_CPU_CAPABILITY", "avx2"), ("MKL_CBWR", "AVX2"), ("ONEDNN_MAX_CPU_ISA", "AVX2")):
        os.environ.setdefault(_name, _value)


def __getattr__(name: str):
    # Lazy, so `import routecast` stays light (no torch until a Predictor is asked for).
    if name in ("Predictor", "Prediction"):
        from routecast.predictors import serve as predictor

        return getattr(predictor, name)
    raise AttributeError(f"module 'routecast' has no attribute {name!r}")
