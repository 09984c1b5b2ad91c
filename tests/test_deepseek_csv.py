"""`extract.logs.format: deepseek_csv`: the DeepSeek-V2-Lite log (one `prompt_N_data.csv` per prompt,
layer-major rows, unordered expert sets without weights)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from routecast.config.params import LogsParams
from routecast.data.traces import TraceError, read_traces
from routecast.sources.logs import import_logs

SHARED_TRACES = Path(__file__).resolve().parents[2] / "shared" / "traces"
DEEPSEEK_DIR = SHARED_TRACES / "deepseek-v2-lite-chat-puffin"
HEADER = "Layer ID,Batch Number,Token,Activated Expert IDs\r\n"


def write_log(folder: Path, name: str, rows: list[tuple[int, str, list[int]]]) -> Path:
    """A file in the log's own format: CRLF lines, the token quoted by the csv rules, the set as `"[a, b]"`."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [HEADER]
    for layer, token, ids in rows:
        cell = '"' + token.replace('"', '""') + '"' if any(c in token for c in ',"') else token
        lines.append(f'{layer},0,{cell},"[{", ".join(map(str, ids))}]"\r\n')
    path = folder / name
    path.write_text("".join(lines), encoding="utf-8")
    return path


def layer_major(tokens: list[str], sets: dict[int, list[list[int]]]) -> list[tuple[int, str, list[int]]]:
    return [(layer, tok, ids) for layer, per_token in sets.items() for tok, ids in zip(tokens, per_token)]


def run(path: Path | str, out: Path, **kw) -> tuple[dict, object]:
    report = import_logs(LogsParams(format="deepseek_csv", path=str(path), **kw), out)
    return report, read_traces(out)


def test_two_files_exact_values(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    write_log(logs, "prompt_10_data.csv", layer_major(["ĠHow", 'a,"b'], {
        1: [[5, 1, 3], [2, 0, 4]], 2: [[9, 8, 7], [1, 2, 3]], 3: [[0, 6, 3], [4, 5, 6]]}))
    write_log(logs, "prompt_2_data.csv", layer_major(["x", "y"], {
        1: [[1, 2, 3], [3, 2, 1]], 2: [[4, 5, 6], [6, 5, 4]], 3: [[7, 8, 9], [9, 8, 7]]}))
    report, tr = run(logs, tmp_path / "t.parquet", model="DeepSeek-V2-Lite-Chat")
    m = tr.meta
    assert (m.num_layers, m.num_experts, m.top_k, m.weighted) == (3, 10, 3, False)
    assert m.source == "DeepSeek-V2-Lite-Chat"
    assert report["files"] == 2 and report["rows"] == 12 and report["tokens"] == 4
    assert m.source_params["files"] == 2 and m.source_params["rows"] == 12
    assert m.source_params["missing_layers"]["files"] == 0
    # prompt 2 before prompt 10 (numeric order), seq ids are N, layers 0-based, layer-major rows
    assert tr.seq_id.tolist() == [2] * 6 + [10] * 6
    assert tr.layer.tolist() == [0, 0, 1, 1, 2, 2] * 2
    assert tr.token_pos.tolist() == [0, 1] * 6
    assert tr.experts.tolist() == [[1, 2, 3], [1, 2, 3], [4, 5, 6], [4, 5, 6], [7, 8, 9], [7, 8, 9],
                                   [1, 3, 5], [0, 2, 4], [7, 8, 9], [1, 2, 3], [0, 3, 6], [4, 5, 6]]
    assert tr.token_text.tolist() == ["x", "y"] * 3 + ["ĠHow", 'a,"b'] * 3
    np.testing.assert_allclose(tr.weights, 1 / 3)


def test_a_missing_layer_leaves_its_rows_absent_and_is_counted(tmp_path: Path, caplog) -> None:
    logs = tmp_path / "logs"
    full = {layer: [[0, 1], [2, 3]] for layer in (1, 2, 3)}
    write_log(logs, "prompt_1_data.csv", layer_major(["a", "b"], full))
    write_log(logs, "prompt_2_data.csv", layer_major(["c", "d"], {1: full[1], 3: full[3]}))
    with caplog.at_level(logging.WARNING):
        report, tr = run(logs, tmp_path / "t.parquet")
    assert tr.meta.num_layers == 3 and len(tr) == 10
    assert sorted(tr.layer[tr.seq_id == 2].tolist()) == [0, 0, 2, 2]
    assert report["missing_token_layer_rows"] == 2 and report["files_missing_layers"] == 1
    missing = tr.meta.source_params["missing_layers"]
    assert missing["files"] == 1 and missing["rows"] == 2 and missing["by_file"] == {"prompt_2_data.csv": [1]}
    assert any("prompt_2_data.csv" in r.message and "[1]" in r.message for r in caplog.records)


def test_unequal_layers_name_file_layer_and_counts(tmp_path: Path) -> None:
    rows = layer_major(["a", "b"], {1: [[0, 1], [2, 3]], 2: [[0, 1], [2, 3]]}) + [(3, "a", [0, 1])]
    path = write_log(tmp_path / "logs", "prompt_1_data.csv", rows)
    with pytest.raises(TraceError, match=rf"{path}: line 6: unequal layers: Layer ID 3 has 1 tokens, Layer ID 1 has 2"):
        run(path, tmp_path / "t.parquet")
    assert not (tmp_path / "t.parquet").exists()


@pytest.mark.parametrize(("cell", "reason"), [
    ('"[1, x]"', r"'x' is not an integer"),
    ('"1, 2"', r"is not a list"),
    ('"[1, -2]"', r"id -2 is negative"),
    ('"[1, 2, 3]"', r"3 expert ids .* expected top_k=2"),
    ('"[4, 4]"', r"repeats an id"),
    ("[]", r"empty expert set"),
])
def test_a_bad_set_names_file_and_line(tmp_path: Path, cell: str, reason: str) -> None:
    path = write_log(tmp_path / "logs", "prompt_1_data.csv", layer_major(["a", "b"], {1: [[0, 1], [2, 3]]}))
    path.write_text(path.read_bytes().decode() + f"2,0,a,{cell}\r\n2,0,b,\"[0, 1]\"\r\n")
    with pytest.raises(TraceError, match=rf"{path}: line 4: .*{reason}"):
        run(path, tmp_path / "t.parquet")


def test_other_malformed_input(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    path = write_log(logs, "prompt_1_data.csv", layer_major(["a", "b"], {1: [[0, 1], [2, 3]], 2: [[0, 1], [2, 3]]}))
    good = path.read_bytes().decode()
    out = tmp_path / "t.parquet"
    for text, message in [
        ("Layer,Token,Experts\r\n" + good.split("\r\n", 1)[1], "line 1: expected the header"),
        (HEADER, "empty file: no rows after the header"),
        (good.replace("2,0,b", "x,0,b"), r"line 5: Layer ID 'x' is not an integer"),
        (good.replace("2,0,b", "2,0,c"), r"line 5: token 'c' at position 1 of Layer ID 2, but 'b' in Layer ID 1"),
        (good.replace("2,0,b", "2,0,b,extra"), "line 5: 5 columns"),
        (HEADER + good.split("\r\n", 1)[1].replace("1,0,", "3,0,", 2), r"line 4: Layer ID 2 after Layer ID 3"),
    ]:
        path.write_bytes(text.encode())
        with pytest.raises(TraceError, match=rf"{path}: {message}"):
            run(logs, out)
    # a later file with a Layer ID below the first file's smallest
    path.write_text(good.replace("2,0,", "3,0,").replace("1,0,", "2,0,"))  # layers 2..3
    write_log(logs, "prompt_2_data.csv", layer_major(["a", "b"], {1: [[0, 1], [2, 3]]}))
    below = r"prompt_2_data\.csv: line 2: Layer ID 1 is below the first file's smallest, 2"
    with pytest.raises(TraceError, match=below):
        run(logs, out)
    # num_experts set: ids must be below it
    path.write_text(good)
    (logs / "prompt_2_data.csv").unlink()
    with pytest.raises(TraceError, match=r"prompt_1_data\.csv: line 3: .*id 3 is not below extract.logs.num_experts=3"):
        run(logs, out, num_experts=3)
    assert run(logs, out, num_experts=8)[1].meta.num_experts == 8


def test_a_duplicate_prompt_is_two_sequences(tmp_path: Path) -> None:
    rows = layer_major(["a", "b"], {1: [[0, 1], [2, 3]], 2: [[4, 5], [6, 7]]})
    write_log(tmp_path / "logs", "prompt_3_data.csv", rows)
    write_log(tmp_path / "logs", "prompt_7_data.csv", rows)
    write_log(tmp_path / "logs", "extra.csv", rows)  # not prompt_N: numbered past the largest N
    report, tr = run(tmp_path / "logs", tmp_path / "t.parquet")
    assert report["sequences"] == 3 and sorted(set(tr.seq_id.tolist())) == [3, 7, 8]
    for s in (3, 7, 8):
        assert tr.experts[tr.seq_id == s].tolist() == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_a_glob_path(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    for n in (1, 12, 13, 2):
        write_log(logs, f"prompt_{n}_data.csv", layer_major(["a"], {1: [[n, 20]], 2: [[0, n]]}))
    report, tr = run(str(logs / "prompt_1?_data.csv"), tmp_path / "t.parquet")
    assert report["files"] == 2 and tr.seq_id.tolist() == [12, 12, 13, 13]
    assert tr.experts.tolist() == [[12, 20], [0, 12], [13, 20], [0, 13]]
    assert tr.meta.num_experts == 21


def test_real_deepseek_files(tmp_path: Path) -> None:
    if not DEEPSEEK_DIR.is_dir():
        pytest.skip(f"real traces absent: {DEEPSEEK_DIR} does not exist (shared/ sits beside the repository)")
    pattern = str(DEEPSEEK_DIR / "prompt_1?_data.csv")
    report, tr = run(pattern, tmp_path / "t.parquet", num_experts=64)
    files = sorted(DEEPSEEK_DIR.glob("prompt_1?_data.csv"))
    m = tr.meta
    assert (m.num_layers, m.num_experts, m.top_k, m.weighted) == (26, 64, 6, False)
    assert report["files"] == report["sequences"] == len(files) == 10
    assert sorted(set(tr.seq_id.tolist())) == list(range(10, 20))
    assert tr.experts.max() < 64 and (np.diff(tr.experts, axis=1) > 0).all()
    assert report["missing_token_layer_rows"] == 0 and len(tr) == 26 * report["tokens"]
    first = (tr.seq_id == 10) & (tr.token_pos == 0) & (tr.layer == 0)
    line = files[0].read_text(encoding="utf-8").splitlines()[1]  # prompt_10's first row
    assert line.startswith("1,0,") and sorted(int(i) for i in line.split('"[')[1].rstrip(']"').split(",")) == \
        tr.experts[first][0].tolist()
