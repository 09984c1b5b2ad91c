"""encode_features: trace -> samples with the seed's features and the next layer's target."""

import argparse

from routecast.artifacts import write_json
from routecast.features import encode_features, write_features
from routecast.params import load_params
from routecast.stage import stage
from routecast.traces import read_traces

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("traces", help="canonical trace (Parquet)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default="data/features.parquet")
    parser.add_argument("--report", default="metrics/features.json", help="rows read, samples kept and dropped")
    args = parser.parse_args()
    with stage("encode_features"):
        params = load_params(args.params)
        feats = encode_features(read_traces(args.traces), params.features)
        write_features(args.out, feats)
        write_json(args.report, feats.report)
