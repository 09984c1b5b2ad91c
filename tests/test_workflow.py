""".github/workflows/pr.yml: on every pull request, reproduce, report and post the report with CML."""

from __future__ import annotations

import re

import pytest
from ruamel.yaml import YAML

from conftest import ROOT

WORKFLOW = ROOT / ".github" / "workflows" / "pr.yml"


@pytest.fixture(scope="module")
def workflow() -> dict:
    return YAML(typ="safe", pure=True).load(WORKFLOW.read_text())


@pytest.fixture(scope="module")
def steps(workflow: dict) -> list[dict]:
    (job,) = workflow["jobs"].values()
    return job["steps"]


def script(steps: list[dict]) -> str:
    return "\n".join(step.get("run", "") for step in steps)


def test_runs_on_pull_requests_and_may_comment(workflow: dict) -> None:
    assert "pull_request" in workflow["on"]
    assert workflow["permissions"]["pull-requests"] == "write"


def test_sets_up_python_311_and_installs_as_the_readme_says(steps: list[dict]) -> None:
    python = next(s for s in steps if s.get("uses", "").startswith("actions/setup-python@"))
    assert str(python["with"]["python-version"]) == "3.11"
    assert any(s.get("uses", "").startswith("actions/checkout@") and s.get("with", {}).get("fetch-depth") == 0
               for s in steps), "the diff needs the base branch's history"
    run = script(steps)
    assert "python -m venv .venv" in run
    assert ". .venv/bin/activate && pip install -r requirements.txt -e ." in run
    # Never an unpinned torch.
    for line in run.splitlines():
        if re.search(r"pip install .*\btorch\b", line):
            assert "torch==" in line, line


def test_reproduces_with_small_params_then_reports(steps: list[dict], workflow: dict) -> None:
    run = script(steps)
    assert re.search(r"dvc (exp run|repro)\b", run)
    small = workflow["env"]["CI_PARAMS"]
    assert "-S extract.synthetic.num_sequences=" in small and "-S train.epochs=" in small
    assert "dvc exp run $CI_PARAMS" in run
    report = re.search(r"routecast report --rev \S+ .*--out (\S+)", run)
    assert report, run
    assert report.group(1) == "reports/report.md"
    order = [i for i, s in enumerate(steps) for key in ("dvc exp run", "routecast report", "cml comment")
             if key in s.get("run", "")]
    assert order == sorted(order)


def test_posts_with_cml_updating_its_own_comment(steps: list[dict]) -> None:
    assert any(s.get("uses", "").startswith("iterative/setup-cml@") for s in steps)
    post = next(s for s in steps if "cml comment" in s.get("run", ""))
    command = next(line for line in post["run"].splitlines() if "cml comment" in line)
    assert "cml comment create" in command and "--update" in command  # edits the last comment, no pile-up
    assert re.search(r"--watermark-title[= ]\S+", command)
    assert command.rstrip().endswith("report.md")
    assert post["env"]["REPO_TOKEN"] == "${{ secrets.GITHUB_TOKEN }}"
