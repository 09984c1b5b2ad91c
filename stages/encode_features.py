"""encode_features: trace -> samples with the seed's features and the next layer's target."""

import argparse

from routecast.config.params import load_params
from routecast.data.features import encode_features_file
from routecast.pipeline.artifacts import write_json
from routecast.pipeline.stage import stage


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("traces", help="canonical trace (Parquet)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", required=True, help="encoded samples (Parquet)")
    parser.add_argument("--report", required=True, help="JSON: rows read, samples kept and dropped")
    args = parser.parse_args(argv)
    with stage("encode_features"):
        params = load_params(args.params)
        report = encode_features_file(args.traces, params.features, args.out)  # in bounded memory
        write_json(args.report, report)


if __name__ == "__main__":
    main()
