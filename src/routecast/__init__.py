"""routecast: learn to predict Mixture-of-Experts routing from traces."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy, so `import routecast` stays light (no torch until a Predictor is asked for).
    if name in ("Predictor", "Prediction"):
        from routecast import predictor

        return getattr(predictor, name)
    raise AttributeError(f"module 'routecast' has no attribute {name!r}")
