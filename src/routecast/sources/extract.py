"""Where traces come from: `extract.source` picks one, and each writes the canonical trace."""

from __future__ import annotations

import logging
from pathlib import Path

from routecast.config.params import ExtractParams
from routecast.data.traces import write_traces

log = logging.getLogger(__name__)


def extract_traces(params: ExtractParams, out: str | Path) -> None:
    """Produce `out` (the canonical, validated trace) from the configured source."""
    if params.source == "synthetic":
        from routecast.sources.synthetic import generate

        traces, _ = generate(params.synthetic)
        write_traces(out, traces)
    elif params.source == "import":
        from routecast.sources.logs import import_logs

        import_logs(params.logs, out)
    elif params.source == "hf":
        from routecast.sources.hf import extract_hf  # imports transformers: the optional extra [hf]

        extract_hf(params.hf, out)
    else:  # the params loader admits only the sources above
        raise ValueError(f"extract.source: unknown source {params.source!r}")
