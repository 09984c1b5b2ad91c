"""The artifacts between stages: the canonical trace, the encoded samples, the split, the predictions."""
