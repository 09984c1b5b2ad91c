"""One output head per horizon (`features.horizons`): what every kind that predicts several shares.

A kind with heads (`mlp`, `lookup_mlp`, `gru`: one per horizon, trained together, the loss the mean
over horizons of each head's loss on the samples with a target there; `mixture`: its posterior
pushed d steps; `features.next_token` is one more head, last, keyed NEXT_TOKEN)
has plain attributes `heads` and `horizon_head`. Its call returns head
`horizon_head` (0, the main horizon, unless set); `at_horizon(module, d)` is the same module
answering horizon d, and within `every_head(module)` the call returns every head, [N, heads, E]
(training reads them all at once).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from torch import nn

from routecast.config.params import target_name


def pick_head(out: torch.Tensor, heads: int, head: int) -> torch.Tensor:
    """[N, heads * E] logits -> head `head`'s [N, E], or every head's [N, heads, E] for head -1."""
    if heads == 1:
        return out
    every = out.view(out.shape[0], heads, -1)
    return every if head < 0 else every[:, head]


def at_horizon(module: nn.Module, d: int) -> nn.Module:
    """`module` (a neural kind's, with `horizon_head`) answering horizon d: the same weights, head d's output."""
    horizons = module.config.horizons
    if d not in horizons:
        raise ValueError(f"horizon {target_name(d)}: this {module.config.kind} predicts "
                         f"{[target_name(h) for h in horizons]}")
    if horizons.index(d) == module.horizon_head:
        return module
    view = copy.copy(module)  # shares every parameter and buffer; only the plain `horizon_head` differs
    view.horizon_head = horizons.index(d)
    return view


@contextlib.contextmanager
def every_head(module: nn.Module) -> Iterator[nn.Module]:
    """Within: `module`'s call returns every horizon's head, [N, heads, E] (a kind with one head: unchanged)."""
    if getattr(module, "heads", 1) == 1:
        yield module
        return
    head, module.horizon_head = module.horizon_head, -1
    try:
        yield module
    finally:
        module.horizon_head = head
