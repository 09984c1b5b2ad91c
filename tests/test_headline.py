"""The headline (metrics/headline.json): the figures `dvc exp show` prints, from the detail files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import ROOT, run
from routecast.errors import InputError
from routecast.report.headline import KEYS, best_reference, half_width, headline, labels


def block(value: float, lo: float, hi: float, key: str = "top2", **more: object) -> dict:
    return {key: value, f"{key}_lo": lo, f"{key}_hi": hi, **more}


def synthetic() -> dict:
    """An evaluate.json of a weighted synthetic trace: two models, three references, the oracle."""
    tuned = block(0.7697, 0.7629, 0.7770, top2_vs_oracle=0.97789)
    tuned["vs"] = {"baseline": block(0.2894, 0.2779, 0.3013, "top2_diff"),
                   "lookup_2": block(0.2555, 0.2444, 0.2666, "top2_diff"),
                   "lookup_3": block(0.2041, 0.1929, 0.2160, "top2_diff"),
                   "frequency": block(0.449, 0.437, 0.461, "top2_diff"),
                   "oracle": block(-0.017, -0.02, -0.014, "top2_diff")}
    return {"baseline": block(0.4803, 0.4690, 0.4921), "tuned": tuned, "lookup_2": block(0.5142, 0.505, 0.523),
            "lookup_3": block(0.5656, 0.554, 0.576), "frequency": block(0.3205, 0.311, 0.329),
            "oracle": block(0.7871, 0.781, 0.794), "validation": {"baseline": {"top2": 0.5}}}


def test_the_headline_of_a_synthetic_run() -> None:
    figures = headline(synthetic(), {"tuned": {"speedup_vs_on_demand": 1.01429}}, "mixture")
    assert list(figures) == list(KEYS)  # every figure, in the order `dvc exp show` prints them
    # The wider interval is the baseline's: 49.21 - 48.03 = 1.18 points, rounded up to 1.2.
    assert figures == {"base": 48.0, "tuned": 77.0, "±": 1.2, "kind": "mixture", "oracle": 97.8,
                       "gain": 20.4, "gain±": 1.2, "speedup": 1.014}
    # The best reference is the highest on test (lookup_3, not the first listed, not the oracle).
    assert labels(synthetic()) == {"metric": "top2", "reference": "lookup_3"}


def test_half_widths_round_up_never_down() -> None:
    assert half_width(block(0.5, 0.49, 0.5101), "top2") == 1.1  # 1.01 points -> 1.1
    assert half_width(block(0.5, 0.49, 0.51), "top2") == 1.0  # exactly 1.0 stays (no float noise)
    assert half_width(block(0.5, 0.4, 0.52), "top2") == 10.0  # the wider side counts


def test_a_trace_without_a_primary_heads_with_set_recall_and_no_oracle() -> None:
    tuned = block(0.47, 0.46, 0.48, "set_recall", top2=None)
    tuned["vs"] = {"baseline": block(0.1, 0.09, 0.11, "set_recall_diff"),
                   "lookup_1": block(0.05, 0.03, 0.07, "set_recall_diff")}
    evaluate = {"baseline": block(0.37, 0.36, 0.38, "set_recall", top2=None), "tuned": tuned,
                "lookup_1": block(0.42, 0.41, 0.43, "set_recall", top2=None)}
    figures = headline(evaluate, {}, "gru")
    assert figures == {"base": 37.0, "tuned": 47.0, "±": 1.0, "kind": "gru", "gain": 5.0, "gain±": 2.0}
    assert labels(evaluate) == {"metric": "set_recall", "reference": "lookup_1"}


def test_no_reference_and_no_simulation_leave_their_figures_out() -> None:
    evaluate = synthetic()
    evaluate["tuned"]["vs"] = {"baseline": evaluate["tuned"]["vs"]["baseline"]}
    assert best_reference(evaluate, "top2") is None
    figures = headline(evaluate, {"tuned": {"speedup_vs_on_demand": float("nan")}}, "mlp")
    assert "gain" not in figures and "speedup" not in figures and figures["base"] == 48.0


def test_too_few_test_sequences_for_an_interval_leave_the_half_widths_out() -> None:
    evaluate = synthetic()
    evaluate["tuned"]["top2_lo"] = evaluate["tuned"]["top2_hi"] = None  # as evaluate writes them then
    evaluate["tuned"]["vs"]["lookup_3"].update(top2_diff_lo=None, top2_diff_hi=None)
    figures = headline(evaluate, None, "mlp")
    assert "±" not in figures and "gain±" not in figures and figures["gain"] == 20.4


@pytest.mark.parametrize(("drop", "message"), [("baseline", "no `baseline` block"),
                                               ("top2", "`baseline` has no top2")])
def test_a_broken_evaluate_file_is_named(drop: str, message: str) -> None:
    evaluate = synthetic()
    if drop == "baseline":
        del evaluate["baseline"]
    else:
        evaluate["baseline"]["top2"] = None
    with pytest.raises(InputError, match=f"metrics/evaluate.json: {message}"):
        headline(evaluate, None, "mlp")


def test_the_stage_writes_the_headline_and_says_so(tmp_path: Path) -> None:
    (tmp_path / "evaluate.json").write_text(json.dumps(synthetic()))
    (tmp_path / "prefetch.json").write_text(json.dumps({"tuned": {"speedup_vs_on_demand": 1.2}}))
    out = tmp_path / "metrics" / "headline.json"
    done = run(["python", str(ROOT / "stages" / "headline.py"), "--evaluate", "evaluate.json", "--prefetch",
                "prefetch.json", "--params", str(ROOT / "params.yaml"), "--out", str(out)], tmp_path)
    text = out.read_text(encoding="utf-8")
    assert '"±": 1.2' in text  # written as itself, for people reading the file
    assert json.loads(text)["speedup"] == 1.2
    assert "best reference lookup_3" in done.stderr
    (tmp_path / "prefetch.json").write_text("{not json")
    bad = run(["python", str(ROOT / "stages" / "headline.py"), "--evaluate", "evaluate.json", "--prefetch",
               "prefetch.json", "--params", str(ROOT / "params.yaml"), "--out", str(out)], tmp_path, check=False)
    assert bad.returncode == 1 and "prefetch.json: not JSON" in bad.stderr
    assert json.loads(out.read_text(encoding="utf-8"))["speedup"] == 1.2  # the last good headline is kept
