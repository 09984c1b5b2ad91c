"""The names the simulate_prefetch stage's outputs share with their readers (the report and its plots).

Kept apart from `routecast.sim.prefetch`, and importing nothing, so a reader knows them without
loading numba or pyarrow. A long-format CSV's header is (x, `predictor`, the value its plot
draws, any other values): the plots read its first three columns by position, and the other
values are `RunResult` properties of the same name.
"""

# The bounds every predictor is replayed between: no prediction (`on_demand`), the true experts of
# layer l + lookahead prefetched for free (`perfect`), no prediction with clairvoyant retention
# (`belady`: evict the expert used farthest ahead), both (`clairvoyant`), and every expert resident
# (`compute_floor`: no stall at all).
BOUNDS = ("on_demand", "perfect", "belady", "clairvoyant", "compute_floor")

# metrics/prefetch/stall_vs_slots.csv: stall against cache slots per layer, one row per (slots, predictor).
SLOTS_COLUMNS = ("slots", "predictor", "stall_ms_per_token", "hit_rate", "mb_per_token")
# metrics/prefetch/hit_rate_vs_width.csv: hit rate against prefetch width, one row per (width, predictor).
WIDTH_COLUMNS = ("width", "predictor", "hit_rate", "stall_ms_per_token", "prefetch_precision")
