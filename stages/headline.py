"""headline: the few figures a reviewer decides on, the one metrics file `dvc exp show` prints."""

import argparse
import json
import logging
from pathlib import Path

from routecast.config.params import load_params
from routecast.errors import InputError
from routecast.pipeline.artifacts import atomic_write_text
from routecast.pipeline.stage import stage
from routecast.report.headline import headline, labels

log = logging.getLogger("routecast.headline")


def read_json(path: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not JSON ({exc})") from exc


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--evaluate", required=True, help="the evaluate stage's metrics (JSON)")
    parser.add_argument("--prefetch", required=True, help="the simulate_prefetch stage's metrics (JSON)")
    parser.add_argument("--params", required=True, help="params.yaml: the tuned kind")
    parser.add_argument("--out", required=True, help="the headline (JSON; see routecast.report.headline)")
    args = parser.parse_args(argv)
    with stage("headline"):
        evaluate = read_json(args.evaluate)
        figures = headline(evaluate, read_json(args.prefetch), load_params(args.params).tuned.kind, args.evaluate)
        # "±" as itself, not \u00b1: the file is read by people too.
        atomic_write_text(args.out, json.dumps(figures, indent=2, ensure_ascii=False) + "\n")
        named = labels(evaluate)
        log.info("headline (%s, best reference %s): %s", named["metric"], named["reference"],
                 ", ".join(f"{k} {v}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
