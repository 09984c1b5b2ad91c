"""split_95_5: samples -> train (validation sequences marked in `is_val`) and test, by sequence."""

import argparse

from routecast.config.params import load_params
from routecast.data.features import read_features, write_features
from routecast.data.split import split_features
from routecast.pipeline.stage import stage


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("features", help="encoded samples (Parquet)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", nargs=2, required=True, metavar=("TRAIN", "TEST"),
                        help="the train split (validation sequences marked) and the test split (Parquet)")
    args = parser.parse_args(argv)
    with stage("split_95_5"):
        params = load_params(args.params)
        for path, split in zip(args.out, split_features(read_features(args.features), params.split)):
            write_features(path, split)


if __name__ == "__main__":
    main()
