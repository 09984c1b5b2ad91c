"""The plots page offline: every `dvc plots` view of dvc.yaml as inline SVG in one HTML file.

`dvc plots show` writes a page that loads Vega from a CDN, so it is blank on a machine without
network. This page holds the same views (DVC fills its templates: `dvc plots show --json`, or
`dvc plots diff <rev> --json` for both revisions) drawn by Vega itself, run in-process by the
vl-convert package: no script and no external resource, so it renders anywhere, and as an
artifact of CI too. `routecast plots` writes it; `routecast report` writes it beside report.md.
"""

from __future__ import annotations

import html
import logging
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from routecast.errors import InputError
from routecast.pipeline.artifacts import atomic_write_text

log = logging.getLogger(__name__)

# A reference that a browser would fetch: src/href (incl. xlink:href) or CSS url()/@import to
# another origin ("http:", "https:", or protocol-relative "//"). XML namespaces (xmlns=...) are names,
# never fetched, and are not matched.
_EXTERNAL = re.compile(r"""(?:\b(?:src|href|xlink:href|srcset|action|poster|data)\s*=\s*["']?\s*"""
                       r"""|url\(\s*["']?\s*|@import\s+["']?\s*)"""
                       r"""(?P<url>(?:[a-z][a-z0-9+.-]*:)?//[^\s"'()<>]*)""", re.IGNORECASE)


def external_urls(page: str) -> list[str]:
    """Every URL in `page` that a browser would load from the network (empty: offline-safe)."""
    return [m.group("url") for m in _EXTERNAL.finditer(page)]


def dvc_plots_json(repo: Path, rev: str | None = None) -> dict[str, Any]:
    """`dvc plots show --json` (rev None) or `dvc plots diff <rev> --json`, parsed."""
    import json

    args = ["plots", "show"] if rev is None else ["plots", "diff", rev]
    done = subprocess.run([sys.executable, "-m", "dvc", *args, "--json"], cwd=repo, capture_output=True, text=True)
    try:
        parsed = json.loads(done.stdout)
    except json.JSONDecodeError:
        raise InputError(f"`dvc {' '.join(args)} --json` in {repo} failed: "
                         f"{(done.stderr or done.stdout).strip().splitlines()[-1:] or ['no output']}") from None
    return parsed


def svg_of(spec: dict[str, Any]) -> str:
    import vl_convert

    return vl_convert.vegalite_to_svg(spec)


def render(plots: dict[str, Any], title: str) -> tuple[str, int]:
    """The page's HTML and the number of views drawn, from DVC's plots JSON."""
    sections, drawn = [], 0
    for name, entries in (plots.get("data") or {}).items():
        parts = []
        for entry in entries:
            if entry.get("type") == "vega":
                parts.append(svg_of(entry["content"]))
                drawn += 1
            else:
                parts.append(f"<p>Not drawn here: a plot of type {html.escape(str(entry.get('type')))} "
                             f"(`dvc plots show` shows it).</p>")
        sections.append(f"<section><h2>{html.escape(name)}</h2>\n" + "\n".join(parts) + "\n</section>")
    errors = plots.get("errors") or []
    notes = "".join(f"<li>{html.escape(str(e.get('name')))} ({html.escape(str(e.get('rev')))}): "
                    f"{html.escape(str(e.get('msg') or e.get('type')))}</li>" for e in errors)
    page = "\n".join([
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:1.5em;max-width:1100px}"
        "section{margin-bottom:2em}h2{font-size:1.1em}</style>",
        "</head>", "<body>", f"<h1>{html.escape(title)}</h1>",
        "<p>The views of dvc.yaml's <code>plots:</code>, drawn by Vega (vl-convert) from "
        "<code>dvc plots --json</code>. No script and no external resource: it renders offline.</p>",
        *(["<p>Not drawn, with DVC's reason (a series a predictor kind does not write, a revision "
           f"without the file):</p><ul>{notes}</ul>"] if notes else []),
        *sections, "</body>", "</html>", ""])
    return page, drawn


def write_plots_page(repo: str | Path = ".", out: str | Path = "reports/plots.html", rev: str | None = None) -> Path:
    """Write the offline plots page of `repo`'s workspace (and of `rev`, when given)."""
    repo, out = Path(repo).resolve(), Path(out)
    out = out if out.is_absolute() else Path.cwd() / out
    title = "routecast plots: workspace" + (f" vs {rev}" if rev else "")
    page, drawn = render(dvc_plots_json(repo, rev), title)
    if found := external_urls(page):  # the page's promise; a template that pulls a URL in breaks it
        raise InputError(f"{out}: the plots page would load {found[0]} from the network")
    atomic_write_text(out, page)
    log.info("plots: wrote %s (%d views drawn)", out, drawn)
    return out
