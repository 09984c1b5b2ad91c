"""The `routecast` command: a table of subcommands, each a small function over the library.

    routecast report --rev main     # Markdown + PNGs comparing the workspace with a revision

Add a subcommand by writing `add_<name>(subparsers)` that registers its parser with
`set_defaults(func=...)`, and listing it in SUBCOMMANDS.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence


def run_report(args: argparse.Namespace) -> int:
    from routecast.report import ReportError, build_report

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


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [add_report]


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
