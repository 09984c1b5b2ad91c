"""Every predictor: the kinds (one module each, in the registry), the reference tables, the oracle, and
the `Predictor` an engine calls."""
