"""params.yaml stays in the form DVC writes back: `dvc exp run -S key=value` (DVC's own writer,
called here directly) changes the line of that key and no other, and tune's `write_tuned` writes
the file as DVC would, so a committed experiment's params diff is the knobs it changed."""

from __future__ import annotations

import difflib
import shutil
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from conftest import ROOT
from routecast.config.params import ModelParams, load_params, write_tuned


def dvc_rewrite(text: str, overrides: list[str], tmp_path: Path) -> str:
    """What `dvc exp run -S <overrides>` writes into a params.yaml holding `text`."""
    from dvc.utils.hydra import apply_overrides

    path = tmp_path / "params.yaml"
    path.write_text(text)
    apply_overrides(str(path), overrides)
    return path.read_text()


def leaves(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Every leaf key (lists are leaves) with its value."""
    if isinstance(node, dict) and node:
        return [leaf for k, v in node.items() for leaf in leaves(v, f"{prefix}.{k}" if prefix else str(k))]
    return [(prefix, node)]


def other_value(value: Any) -> str:
    """A different value of the same shape, as a `-S` override spells it."""
    if isinstance(value, bool):
        return "false" if value else "true"
    if isinstance(value, (int, float)):
        return repr(value * 3 + 1)
    if isinstance(value, list):
        changed = [*value[:-1], value[-1] + 1] if value else [1]
        return "[" + ",".join(str(v) for v in changed) + "]"
    if value is None:
        return "7"
    return f"{value}x"


def changed_lines(before: str, after: str) -> tuple[list[str], list[str]]:
    diff = list(difflib.unified_diff(before.splitlines(), after.splitlines(), lineterm="", n=0))
    removed = [line[1:] for line in diff[2:] if line.startswith("-")]
    added = [line[1:] for line in diff[2:] if line.startswith("+")]
    return removed, added


def test_params_yaml_is_what_dvc_writes_back(tmp_path: Path) -> None:
    text = (ROOT / "params.yaml").read_text()
    assert dvc_rewrite(text, ["train.seed=0"], tmp_path) == text


def test_every_single_knob_changes_one_line(tmp_path: Path) -> None:
    text = (ROOT / "params.yaml").read_text()
    data = YAML(typ="safe").load(text)
    wrong = []
    keys = leaves(data)
    for key, value in keys:
        override = f"{key}={other_value(value)}"
        removed, added = changed_lines(text, dvc_rewrite(text, [override], tmp_path))
        # An empty list given an item takes two lines: its key and the item (block style).
        if len(removed) != 1 or len(added) != (2 if value == [] else 1):
            wrong.append(f"{override}: -{removed} +{added}")
    assert len(keys) > 100
    assert not wrong, "\n".join(wrong)


def test_the_check_fails_on_a_file_dvc_would_rewrite(tmp_path: Path) -> None:
    """A flow list and an explicit null (what params.yaml used to hold) each cost extra lines."""
    text = (ROOT / "params.yaml").read_text()
    bad = text.replace("  history_len:      ", "  history_len: null", 1)
    assert bad != text
    removed, added = changed_lines(bad, dvc_rewrite(bad, ["train.seed=1"], tmp_path))
    assert len(removed) == 2 and "  history_len: null" in removed[0]


@pytest.mark.parametrize("config, lines", [
    (ModelParams.of("mixture", num_types=12, smoothing=0.5), 2),  # tune's pick, same kind: its two lines
    (load_params(ROOT / "params.yaml").tuned, 0),  # the committed pick again: nothing
    (ModelParams.of("gru", lr=1.234567e-05, hidden=64), None),  # another kind: the block
])
def test_write_tuned_writes_as_dvc_does(config: ModelParams, lines: int | None, tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", path)
    before = path.read_text()
    write_tuned(config, path)
    after = path.read_text()
    assert load_params(path).tuned == config
    (tmp_path / "dvc").mkdir()
    assert dvc_rewrite(after, ["train.seed=0"], tmp_path / "dvc") == after  # still in DVC's form
    removed, added = changed_lines(before, after)
    if lines is not None:
        assert len(removed) == len(added) == lines
        knobs = [f"tuned.mixture.{k}={v}" for k, v in vars(config.config).items()]
        assert dvc_rewrite(before, knobs, tmp_path / "dvc") == after  # byte for byte what DVC writes
    block = before[before.index("\ntuned:"):before.index("\ntrain:")].splitlines()
    assert set(removed) <= set(block)  # nothing outside the tuned block moved
    comments = [line for line in before.splitlines() if line.lstrip().startswith("#")]
    assert all(line in after.splitlines() for line in comments)
    assert "\n\ntrain:" in after  # the blank line after the block stays


def test_write_tuned_keeps_twelve_digits_of_an_e_notation_float(tmp_path: Path) -> None:
    """ruamel re-spells a longer one on every later rewrite (its last digit drifts)."""
    path = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", path)
    write_tuned(ModelParams.of("gru", lr=1.23456789012345e-05), path)
    assert load_params(path).tuned.config.lr == 1.23456789012e-05
    text = path.read_text()
    (tmp_path / "dvc").mkdir()
    assert dvc_rewrite(text, ["train.seed=0"], tmp_path / "dvc") == text

