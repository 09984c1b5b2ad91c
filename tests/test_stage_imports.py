"""No stage loads torch, numba or pyarrow that it does not use.

Each takes a second or more to import, and every stage runs as its own process. A stage's script
keeps its body in `main()`, so importing it runs only its module level: the imports outside
functions, and through them every routecast module's (`routecast.pipeline.codegraph.eager_closure`).
Those heavy packages are checked two ways: read from the source against the table below, and
measured by importing the script in a fresh interpreter; the two must agree.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from routecast.pipeline.codegraph import eager_closure, eager_import_chain, module_path, top_level_packages

HEAVY = ("torch", "numba", "pyarrow")
STAGES = ROOT / "stages"

# stage -> (the heavy packages importing its script loads, why it needs them)
EXPECTED: dict[str, tuple[set[str], str]] = {
    "check_params": (set(), "validates params.yaml: YAML and dataclasses only"),
    "extract_traces": ({"pyarrow"}, "writes the canonical trace (Parquet)"),
    "encode_features": ({"pyarrow"}, "reads the trace, writes the samples (Parquet); the encoder is NumPy: no numba"),
    "split_95_5": ({"pyarrow"}, "reads and writes the samples (Parquet)"),
    "tune": ({"torch", "pyarrow"}, "trains models (torch) on the train split (Parquet)"),
    "train_full": ({"torch", "pyarrow"}, "trains a model (torch) on the train split (Parquet)"),
    "evaluate": ({"torch", "pyarrow"}, "runs the models (torch) on the splits and writes the predictions (Parquet)"),
    "simulate_prefetch": ({"numba", "pyarrow"}, "replays (numba) the trace and the predictions (Parquet); runs no "
                                                "model, so no torch"),
    "headline": (set(), "reads two JSON files and params.yaml: no model, no Parquet"),
}

# Print which heavy packages the interpreter has loaded (the last line of every probe below).
REPORT = f"import sys; print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
IMPORT_SCRIPT = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("script_under_test", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)  # its module level only: __name__ is not "__main__"
"""


def loaded(code: str, *args: str) -> set[str]:
    """The heavy packages loaded once a fresh interpreter has run `code`."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, "-c", f"{code}\n{REPORT}", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return set(proc.stdout.split())


def imported_heavy(script: Path) -> set[str]:
    """Measured: the heavy packages loaded by importing `script` (without running its main())."""
    return loaded(IMPORT_SCRIPT, str(script))


@functools.cache
def pulled_by(statement: str) -> frozenset[str]:
    """The heavy packages an import of another package loads (`import pandas` loads pyarrow)."""
    return frozenset(loaded(statement))


def heavy_statements(paths: list[Path]) -> dict[str, set[str]]:
    """Read from the source: each heavy package importing `paths` loads -> the import statements
    (outside routecast) that load it: the package's own, or another package's that loads it."""
    _, statements = eager_closure(paths)
    found: dict[str, set[str]] = {}
    for statement in statements:
        (package,) = top_level_packages({statement})
        for heavy in {package} if package in HEAVY else pulled_by(statement):
            found.setdefault(heavy, set()).add(statement)
    return found


def static_heavy(script: Path) -> set[str]:
    return set(heavy_statements([script]))


def mismatch(script: Path, expected: set[str]) -> list[str]:
    """What is wrong with `script`'s heavy imports against `expected`, each loaded package it should
    not load with the chain of module-level imports that loads it; [] when they match."""
    found = heavy_statements([script])
    problems = []
    for heavy in sorted(set(found) - expected):
        for package in sorted(top_level_packages(found[heavy])):  # one chain per package imported
            chain = eager_import_chain(script, package) or [str(script)]
            via = "" if package == heavy else f" (through {package}, which loads it)"
            problems.append(f"loads {heavy} at import{via}: " + " -> ".join(chain))
    problems += [f"does not load {heavy} at import: the table expects it (out of date?)"
                 for heavy in sorted(expected - set(found))]
    return problems


def test_the_table_names_every_stage() -> None:
    assert set(EXPECTED) == {path.stem for path in STAGES.glob("*.py")}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_a_stage_imports_only_the_heavy_packages_it_uses(name: str) -> None:
    expected, why = EXPECTED[name]
    problems = mismatch(STAGES / f"{name}.py", expected)
    assert not problems, f"stages/{name}.py ({why}):\n  " + "\n  ".join(problems)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_the_source_tells_what_importing_the_stage_loads(name: str) -> None:
    """The static answer above is what really happens: import the script, main() not run."""
    script = STAGES / f"{name}.py"
    assert static_heavy(script) == imported_heavy(script)


def test_the_report_loads_no_model_and_no_simulator() -> None:
    """`routecast report` needs the evaluate and simulate outputs' names, not torch or numba."""
    modules = ["routecast.report.summary", "routecast.report.plotting"]
    assert not {"torch", "numba"} & set(heavy_statements([module_path(m) for m in modules]))
    assert not {"torch", "numba"} & loaded(f"import {', '.join(modules)}")


# --------------------------------------------------------------------------- the check can fail


def test_the_check_names_a_heavy_import_a_script_should_not_make(tmp_path: Path) -> None:
    """Only what runs at import counts: not a function's imports, nor TYPE_CHECKING's or __main__'s."""
    script = tmp_path / "greedy.py"
    script.write_text("from typing import TYPE_CHECKING\n"
                      "import torch\n"
                      "if TYPE_CHECKING:\n"
                      "    import pyarrow\n"
                      "def main():\n"
                      "    import numba\n"
                      "if __name__ == '__main__':\n"
                      "    import pyarrow.parquet\n"
                      "    main()\n")
    assert static_heavy(script) == {"torch"}
    assert mismatch(script, {"torch"}) == []
    assert mismatch(script, set()) == [f"loads torch at import: {script}:2: import torch"]
    assert mismatch(script, {"torch", "numba"}) == [
        "does not load numba at import: the table expects it (out of date?)"]


def test_the_check_follows_routecast_modules_and_other_packages(tmp_path: Path) -> None:
    """A heavy package loaded through a routecast module, or by another package (pandas loads
    pyarrow here), is found, and the source agrees with what importing the script loads."""
    through_routecast = tmp_path / "through_routecast.py"
    through_routecast.write_text("from routecast.data.split import split_features\n")
    problems = mismatch(through_routecast, set())
    assert len(problems) == 1 and problems[0].startswith(f"loads pyarrow at import: {through_routecast} -> "
                                                         "src/routecast/data/split.py -> src/routecast/data/features.py"
                                                         ":"), problems
    assert static_heavy(through_routecast) == imported_heavy(through_routecast) == {"pyarrow"}

    through_pandas = tmp_path / "through_pandas.py"
    through_pandas.write_text("import pandas\n")
    assert static_heavy(through_pandas) == imported_heavy(through_pandas) == set(pulled_by("import pandas"))
