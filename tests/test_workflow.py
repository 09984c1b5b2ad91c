""".github/workflows/pr.yml: the pull-request job's commands work against this code: its CI params
are valid params, its `routecast report` arguments parse, its install is the README's, in order."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from conftest import ROOT, set_params
from routecast import cli
from routecast.config.params import load_params

WORKFLOW = ROOT / ".github" / "workflows" / "pr.yml"


@pytest.fixture(scope="module")
def workflow() -> dict:
    return YAML(typ="safe", pure=True).load(WORKFLOW.read_text())


@pytest.fixture(scope="module")
def steps(workflow: dict) -> list[dict]:
    (job,) = workflow["jobs"].values()
    return job["steps"]


def commands(steps: list[dict], program: str) -> list[list[str]]:
    """Every command line of the steps' scripts that runs `program`, split as the shell would."""
    out = []
    for step in steps:
        for line in step.get("run", "").splitlines():
            words = shlex.split(line, comments=True)
            if program in words:
                out.append(words[words.index(program):])
    return out


def test_ci_params_are_valid_params(workflow: dict, tmp_path: Path) -> None:
    """Every `-S key=value` of CI_PARAMS names an existing key and the result validates (a renamed
    or removed param, or a bad value, fails here instead of on the pull request)."""
    pairs = re.findall(r"-S\s+(\S+?)=(\S+)", workflow["env"]["CI_PARAMS"])
    assert pairs
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    known = YAML(typ="safe").load(params.read_text())
    updates = {}
    for key, value in pairs:
        node = known
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, f"CI_PARAMS: {key} is not a params.yaml key"
            node = node[part]
        updates[key] = YAML(typ="safe").load(value)
    set_params(params, updates)
    load_params(params)  # raises ParamsError naming the bad key


def test_report_command_parses_with_the_cli(steps: list[dict]) -> None:
    (report,) = [c for c in commands(steps, "routecast") if c[1] == "report"]
    parser = argparse.ArgumentParser()
    cli.add_report(parser.add_subparsers(dest="command"))
    args = parser.parse_args([a.replace('"', "") for a in report[1:]])
    assert args.out == "reports/report.md"


def test_installs_as_the_readme_and_reproduces_before_reporting(steps: list[dict]) -> None:
    readme = (ROOT / "README.md").read_text()
    pip = [c for c in commands(steps, "pip") if "-r" in c]
    assert pip and all(ROOT.joinpath(c[c.index("-r") + 1]).is_file() for c in pip)
    assert "pip install -r requirements.txt -e ." in readme
    for line in (step.get("run", "") for step in steps):
        for match in re.finditer(r"pip install[^\n]*\btorch\b[^\n]*", line):
            assert "torch==" in match.group(0), match.group(0)  # never an unpinned torch
    order = [i for i, s in enumerate(steps) for key in ("dvc exp run", "routecast report", "cml comment")
             if key in s.get("run", "")]
    assert len(order) >= 3 and order == sorted(order)
