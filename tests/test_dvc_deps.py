"""dvc.yaml's code deps are complete: every stage lists its script and every src/routecast module
the script imports, transitively (read from the source's import graph), and nothing else of
src/, so a code change reruns exactly the stages it affects."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from conftest import ROOT
from routecast.pipeline.codegraph import closure, imports_of

SCRIPT = re.compile(r"python (stages/\w+\.py)")


def stages(dvc_yaml: Path) -> dict[str, dict]:
    """Every stage, foreach stages expanded (their code deps do not depend on the item)."""
    doc = YAML(typ="safe").load(dvc_yaml.read_text())
    out = {}
    for name, stage in doc["stages"].items():
        if "foreach" in stage:
            for key in stage["foreach"]:
                out[f"{name}@{key}"] = stage["do"]
        else:
            out[name] = stage
    return out


def code_deps(stage: dict) -> set[str]:
    return {d for d in stage.get("deps", []) if isinstance(d, str) and d.endswith(".py")}


def missing_and_extra(stage: dict, root: Path) -> tuple[list[str], list[str]]:
    script = SCRIPT.search(" ".join(stage["cmd"].split())).group(1)
    wanted = {script} | {str(p.relative_to(root)) for p in closure([root / script], root / "src" / "routecast")}
    listed = code_deps(stage)
    return sorted(wanted - listed), sorted(listed - wanted)


@pytest.mark.parametrize("name", sorted(stages(ROOT / "dvc.yaml")))
def test_stage_deps_list_every_module_it_imports(name: str) -> None:
    missing, extra = missing_and_extra(stages(ROOT / "dvc.yaml")[name], ROOT)
    assert not missing, f"dvc.yaml: stage {name} imports but does not list: {missing}"
    assert not extra, f"dvc.yaml: stage {name} lists code it does not import: {extra}"


def test_the_check_fails_when_a_dep_is_removed(tmp_path: Path) -> None:
    """Drop one module from one stage's deps in a copy of dvc.yaml: the check names it."""
    text = (ROOT / "dvc.yaml").read_text()
    doc = stages(ROOT / "dvc.yaml")
    victim = sorted(d for d in code_deps(doc["evaluate"]) if d.startswith("src/"))[0]
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("  evaluate:"))
    drop = next(i for i in range(start, len(lines)) if lines[i].strip() == f"- {victim}")
    (tmp_path / "dvc.yaml").write_text("\n".join(lines[:drop] + lines[drop + 1:]) + "\n")
    missing, _ = missing_and_extra(stages(tmp_path / "dvc.yaml")["evaluate"], ROOT)
    assert missing == [victim]


def test_import_graph_sees_imports_inside_functions(tmp_path: Path) -> None:
    source = tmp_path / "mod.py"
    source.write_text("import os\nfrom routecast.config.params import load_params\n\n"
                      "def later():\n    from routecast.predictors import oracle\n    import routecast.data.split\n")
    assert imports_of(source) == {"routecast.config.params", "routecast.predictors", "routecast.predictors.oracle",
                                  "routecast.data.split"}
