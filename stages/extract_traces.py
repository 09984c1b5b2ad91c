"""extract_traces: the `extract` params -> the canonical trace (data/traces.parquet)."""

import argparse

from routecast.config.params import load_params
from routecast.pipeline.stage import stage
from routecast.sources.extract import extract_traces


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", required=True, help="the canonical trace (Parquet)")
    args = parser.parse_args(argv)
    with stage("extract_traces"):
        params = load_params(args.params)
        extract_traces(params.extract, args.out)


if __name__ == "__main__":
    main()
