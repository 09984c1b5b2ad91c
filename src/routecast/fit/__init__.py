"""Fitting: the training loop, the Optuna search across kinds, and where the study is stored."""
