"""Scoring predictors on held-out sequences: hits, bootstrap intervals, paired differences."""
