"""The `routecast` command: a table of subcommands, each a small function over the library.

    routecast report --rev main     # Markdown + PNGs comparing the workspace with a revision
    routecast plots                 # the `dvc plots` views as one page that renders offline
    routecast tiny-model DIR        # a tiny random MoE model to try extract.source: hf

Add a subcommand by writing `add_<name>(subparsers)` that registers its parser with
`set_defaults(func=...)`, and listing it in SUBCOMMANDS.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence


def run_report(args: argparse.Namespace) -> int:
    from routecast.report.summary import ReportError, build_report

    try:
        report = build_report(args.rev, args.out, args.repo, args.rev_label, args.note)
    except ReportError as exc:
        logging.getLogger("routecast.report").error("%s", exc)
        return 1
    print(report.markdown)
    return 0


def add_report(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("report", help="Markdown report: metrics, params and plots vs a git revision",
                                   description="Compare the workspace's metrics, params and plots with a git "
                                               "revision's, as Markdown with PNG plots beside it.")
    parser.add_argument("--rev", default="main", help="git revision to compare with (default: main)")
    parser.add_argument("--out", default="reports/report.md", help="Markdown file; the PNGs go beside it")
    parser.add_argument("--repo", default=".", help="repository root (default: the current directory)")
    parser.add_argument("--rev-label", help="how the report names the revision (default: --rev)")
    parser.add_argument("--note", help="a line of Markdown under the title (e.g. the params both sides ran at)")
    parser.set_defaults(func=run_report)


def run_plots(args: argparse.Namespace) -> int:
    from routecast.errors import InputError
    from routecast.report.page import write_plots_page

    try:
        print(write_plots_page(args.repo, args.out, args.rev))
    except InputError as exc:
        logging.getLogger("routecast.plots").error("%s", exc)
        return 1
    return 0


def add_plots(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("plots", help="the dvc.yaml plot views as one HTML page that renders offline",
                                   description="Draw every view of dvc.yaml's `plots:` (as `dvc plots show`, or "
                                               "`dvc plots diff REV` with --rev) into one HTML page of inline SVG: "
                                               "no script and no external resource, so it renders offline.")
    parser.add_argument("--rev", help="also draw this git revision's data, as `dvc plots diff REV` does")
    parser.add_argument("--out", default="reports/plots.html", help="the page (default: reports/plots.html)")
    parser.add_argument("--repo", default=".", help="repository root (default: the current directory)")
    parser.set_defaults(func=run_plots)


def run_tiny_model(args: argparse.Namespace) -> int:
    from routecast.sources.tiny_model import save_tiny_model  # imports transformers: the [hf] extra

    path = save_tiny_model(args.path, args.family, args.seed, num_layers=args.layers, num_experts=args.experts,
                           top_k=args.top_k)
    print(f"saved a tiny {args.family} model ({args.layers} layers, {args.experts} experts, top-{args.top_k}) "
          f"to {path}")
    return 0


def add_tiny_model(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("tiny-model",
                                   help="save a tiny random MoE model and tokenizer (for extract.source: hf)",
                                   description="Save a tiny randomly initialised MoE causal LM and a byte-level "
                                               "tokenizer to a directory, to try `extract.source: hf` without a "
                                               "download. Its routing is random: for testing, not accuracy.")
    parser.add_argument("path", help="directory to write")
    parser.add_argument("--family", default="mixtral", choices=["mixtral", "olmoe", "qwen2_moe", "qwen3_moe"])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run_tiny_model)


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [add_report, add_plots, add_tiny_model]


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s",
                        datefmt="%H:%M:%S")
    parser = argparse.ArgumentParser(prog="routecast", description=__doc__.split("\n\n")[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(subparsers)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
