"""check_params, check_params_after_tune: validate the whole params file before a stage runs.

DVC empties a stage's outputs before it runs the stage, so a bad value found by the stage
itself has already cost the last good outputs. These two stages run first (see dvc.yaml:
every stage waits on one of them), so a bad or misspelled key stops `dvc repro` /
`dvc exp run` before any other output is touched. The output's content never changes, so a
passing check reruns nothing downstream.
"""

import argparse
import logging

from routecast.config.params import load_params
from routecast.pipeline.artifacts import atomic_write_text
from routecast.pipeline.stage import stage

# Never change this text: every stage depends on the file, and new content would rerun them all.
CHECKED = "params.yaml passed routecast.config.params.load_params (stages/check_params.py)\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("params", help="the params file (params.yaml)")
    parser.add_argument("--out", required=True, help="written when the params are valid; other stages depend on it")
    args = parser.parse_args(argv)
    with stage("check_params"):
        for note in load_params(args.params).idle_knobs():
            logging.getLogger("check_params").warning(note)
        atomic_write_text(args.out, CHECKED)


if __name__ == "__main__":
    main()
