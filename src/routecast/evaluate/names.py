"""The names the evaluate stage's outputs share with their readers (the report and its plots).

Kept apart from `routecast.evaluate.evaluation`, and importing nothing, so a reader knows them
without loading torch or pyarrow. A long-format CSV's header is (x, `predictor`, the value its
plot draws, any other values): the plots read its first three columns by position.
"""

# The trained models (train_full's two params blocks), drawn thick in every plot.
MODELS = ("baseline", "tuned")

# metrics/evaluate/per_layer_top2.csv: test top-2 per source layer, one row per (layer, predictor);
# for a trace without a primary (unweighted) the same file holds set recall instead.
PER_LAYER_COLUMNS = ("layer", "predictor", "top2")
PER_LAYER_SET_COLUMNS = ("layer", "predictor", "set_recall")
# metrics/evaluate/per_horizon.csv: test top-2 and set recall per horizon d (features.horizons: the
# target is layer l + d), one row per (horizon, predictor); set recall alone for an unweighted trace.
PER_HORIZON_COLUMNS = ("horizon", "predictor", "top2", "set_recall")
PER_HORIZON_SET_COLUMNS = ("horizon", "predictor", "set_recall")
# metrics/evaluate/confusion_tuned.csv: the tuned model's (actual, predicted top-1), one row per test
# sample; only its header for a trace without a primary.
CONFUSION_COLUMNS = ("actual", "predicted")


def per_layer_columns(metric: str) -> tuple[str, str, str]:
    """The per-layer CSV's header for its metric (`top2`, or `set_recall` for an unweighted trace)."""
    return {"top2": PER_LAYER_COLUMNS, "set_recall": PER_LAYER_SET_COLUMNS}[metric]


def per_horizon_columns(metric: str) -> tuple[str, ...]:
    """The per-horizon CSV's header (its first value column: `metric`, as the per-layer CSV's)."""
    return {"top2": PER_HORIZON_COLUMNS, "set_recall": PER_HORIZON_SET_COLUMNS}[metric]
