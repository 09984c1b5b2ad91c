"""Property-based fuzzing of every import format (hypothesis).

Each test builds a valid input, then may damage it (bytes flipped, inserted, cut; a value swapped
for one from a list of troublemakers; lines repeated, dropped or swapped; files removed). Whatever
comes out, the import must either succeed and round-trip (the trace equals a plain reference
reading of the same bytes, written here without the importer's code) or fail with a TraceError
that names the file, and the line or row where there is one. Never another exception type, and a
failed import never changes the trace that was there before. Undamaged inputs must import.
"""

from __future__ import annotations

import gzip
import json
import re
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, find, given, settings
from hypothesis import strategies as st

from routecast.config.params import LogsParams, SyntheticParams
from routecast.data.traces import TraceError, TraceMeta, Traces, read_traces, write_traces
from routecast.sources.logs import import_logs
from routecast.sources.synthetic import generate

# derandomize: the same examples on every run (deterministic CI); no example database written.
FUZZ = settings(max_examples=60, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

TROUBLE = [None, True, "7", "", 1.5, 3.0, -1, 2**15, 2**31, 2**63, 10**30, -10**30, 1e300, float("nan"),
           float("inf"), [], [1], [[1, 2]], {"a": 1}]

PREVIOUS, _ = generate(SyntheticParams(num_sequences=1, tokens_per_sequence=2, num_layers=2))


def attempt(params: LogsParams, work: Path) -> tuple[Traces | None, str | None]:
    """Import into `work`/traces.parquet over an existing trace: (the trace, None) or (None, the
    error's message). A failure must leave the old trace's bytes and no temporary file."""
    out = work / "traces.parquet"
    write_traces(out, PREVIOUS)
    before = out.read_bytes()
    files = sorted(p.name for p in work.iterdir())
    try:
        import_logs(params, out)
    except TraceError as exc:
        assert out.read_bytes() == before, "a failed import changed the existing trace"
        assert sorted(p.name for p in work.iterdir()) == files, "a failed import left a file behind"
        return None, str(exc)
    return read_traces(out), None


def names_where(message: str, file: str, whole_input: str) -> None:
    """The message starts with the file (or folder) and names a line or row, or is one of the
    errors about the input as a whole (`whole_input`, a regex)."""
    assert file in message.split(": ")[0] or message.startswith(file), message
    assert re.search(r"\b(line|row|token) \d+|" + whole_input, message), message


def damaged_bytes(draw, raw: bytes, span: int, max_new: int) -> bytes:
    """`raw` with up to `span` bytes at a drawn place replaced by up to `max_new` drawn bytes."""
    out = bytearray(raw)
    at = draw(st.integers(0, len(out)))
    out[at:at + draw(st.integers(0, span))] = draw(st.binary(max_size=max_new))
    return bytes(out)


# --------------------------------------------------------------------------- jsonl


@st.composite
def jsonl_logs(draw: st.DrawFn) -> tuple[bytes, bool]:
    """(bytes of a JSON-lines log, whether it was damaged)."""
    n_seq, n_tok, n_layers = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    k = draw(st.integers(1, 3))
    num_experts = draw(st.integers(k, 6))
    string_ids = draw(st.booleans())
    lines = []
    for s in range(n_seq):
        for t in range(n_tok):
            for layer in range(n_layers):
                experts = draw(st.permutations(range(num_experts)))[:k]
                raw = draw(st.lists(st.integers(1, 100), min_size=k, max_size=k))
                row = {"problem_id": f"req-{s}" if string_ids else s,
                       "token_idx": float(t) if draw(st.booleans()) else t,
                       "layer": layer, "experts": experts, "gating_probs": [w / sum(raw) for w in raw],
                       "dataset": draw(st.text(max_size=3))}
                keys = draw(st.permutations(list(row)))
                lines.append(json.dumps({key: row[key] for key in keys}))
    order = draw(st.permutations(range(len(lines))))
    lines = [lines[i] for i in order]
    for _ in range(draw(st.integers(0, 2))):
        lines.insert(draw(st.integers(0, len(lines))), draw(st.sampled_from(["", "  ", "\t"])))
    eol = draw(st.sampled_from(["\n", "\r\n"]))
    damaged = False
    for _ in range(draw(st.integers(0, 3))):
        damaged = True
        kind = draw(st.sampled_from(["value", "drop field", "repeat", "drop", "swap"]))
        i = draw(st.integers(0, len(lines) - 1))
        if kind in ("value", "drop field") and lines[i].strip():
            obj = json.loads(lines[i])
            key = draw(st.sampled_from(sorted(obj)))
            if kind == "value":
                obj[key] = draw(st.sampled_from(TROUBLE))
            else:
                del obj[key]
            lines[i] = json.dumps(obj)
        elif kind == "repeat":
            lines.insert(draw(st.integers(0, len(lines))), lines[i])
        elif kind == "drop" and len(lines) > 1:
            del lines[i]
        elif kind == "swap":
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
    data = bytearray((eol.join(lines) + eol).encode())
    for _ in range(draw(st.integers(0, 2)) if draw(st.booleans()) else 0):
        damaged = True
        at = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["flip", "insert", "cut", "truncate"]))
        if kind == "flip" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=6))
        elif kind == "cut":
            del data[at:at + draw(st.integers(1, 40))]
        elif kind == "truncate":
            del data[at:]
    data = bytes(data)
    if draw(st.booleans()):
        data = gzip.compress(data, mtime=0)
        if draw(st.booleans()):
            damaged = True
            data = data[: draw(st.integers(0, len(data)))]
    return data, damaged


def readable(data: bytes) -> bytes:
    """The log's text: gzip decompressed as far as it goes."""
    if data[:2] != b"\x1f\x8b":
        return data
    stream = zlib.decompressobj(wbits=31)
    try:
        return stream.decompress(data)
    except zlib.error:
        return b""


def reference_jsonl(data: bytes) -> list[tuple]:
    """The rows a JSON-lines log holds, read plainly: one object per non-blank line; experts
    ordered by weight, highest first (stable); string sequence ids numbered in order of appearance."""
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    rows, ids = [], {}
    for line in data.split(b"\n"):
        if not line.strip(b" \t\r"):
            continue
        obj = json.loads(line.decode("utf-8"))
        seq = obj["problem_id"]
        seq = ids.setdefault(seq, len(ids)) if isinstance(seq, str) else int(seq)
        weights = np.asarray(obj["gating_probs"], dtype=np.float32)
        order = np.argsort(-weights, kind="stable")
        rows.append((seq, int(obj["token_idx"]), int(obj["layer"]), [int(obj["experts"][i]) for i in order],
                     weights[order].tolist()))
    return rows


@FUZZ
@given(jsonl_logs())
def test_fuzz_jsonl(case: tuple[bytes, bool]) -> None:
    data, damaged = case
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        path = work / "routing.jsonl"
        path.write_bytes(data)
        traces, error = attempt(LogsParams(path=str(path)), work)
        if error is not None:
            assert damaged, f"an undamaged log was refused: {error}"
            names_where(error, str(path), r"layer gap|empty file|compressed|gzip|longer than")
            lines = readable(data).count(b"\n") + 1
            for n in re.findall(r"line (\d+)", error):
                assert 1 <= int(n) <= lines, error
            return
        assert traces is not None
        expected = reference_jsonl(data)
        got = list(zip(traces.seq_id.tolist(), traces.token_pos.tolist(), traces.layer.tolist(),
                       traces.experts.tolist(), traces.weights.tolist()))
        assert got == expected
        m = traces.meta
        assert (m.num_layers, m.num_experts, m.top_k) == (
            max(r[2] for r in expected) + 1, max(max(r[3]) for r in expected) + 1, len(expected[0][3]))


# --------------------------------------------------------------------------- flame_csv


@st.composite
def flame_folders(draw: st.DrawFn) -> tuple[dict[str, bytes], int | None, bool]:
    """({file name: bytes}, tokens_per_sequence, whether damaged) for a flame_csv folder."""
    k = draw(st.integers(1, 3))
    num_experts = draw(st.integers(k, 5))
    first_layer, n_files = draw(st.integers(0, 3)), draw(st.integers(1, 3))
    fmt = draw(st.sampled_from(["{:.6f}", "{!r}", "{:g}", " {:.3e} "]))
    files = {}
    for layer in range(first_layer, first_layer + n_files):
        lines = ["layer_id,token_id," + ",".join(f"expert_{e}" for e in range(num_experts))]
        for r in range(draw(st.integers(1, 5))):
            scores = ["0"] * num_experts
            for e in draw(st.permutations(range(num_experts)))[:k]:
                scores[e] = fmt.format(draw(st.integers(1, 1000)) / 997)
            lines.append(f"0,{r}," + ",".join(scores))
        files[f"layer_{layer}.csv"] = lines
    damaged = False
    for _ in range(draw(st.integers(0, 3))):
        damaged = True
        name = draw(st.sampled_from(sorted(files)))
        lines = files[name]
        if not lines:
            continue
        kind = draw(st.sampled_from(["cell", "drop cell", "add cell", "blank line", "empty", "drop file", "rename"]))
        i = draw(st.integers(0, len(lines) - 1))
        cells = lines[i].split(",")
        if kind == "cell":
            cells[draw(st.integers(0, len(cells) - 1))] = draw(st.sampled_from(
                ["abc", "", "nan", "inf", "-1", "1e999", '"0.5"', " 0.5 ", "0", "1e-300", "0x1", "é"]))
            lines[i] = ",".join(cells)
        elif kind == "drop cell":
            lines[i] = ",".join(cells[:-1])
        elif kind == "add cell":
            lines[i] = lines[i] + ",0"
        elif kind == "blank line":
            lines.insert(i + 1, "")
        elif kind == "empty":
            files[name] = []
        elif kind == "drop file" and len(files) > 1:
            del files[name]
        elif kind == "rename":
            files[name.replace("layer_", "layer-")] = files.pop(name)
    out = {name: ("\n".join(lines) + "\n" if lines else "").encode() for name, lines in files.items()}
    if draw(st.booleans()) and draw(st.booleans()):
        damaged = True
        name = draw(st.sampled_from(sorted(out)))
        out[name] = damaged_bytes(draw, out[name], span=5, max_new=4)
    return out, draw(st.none() | st.integers(1, 3)), damaged


def reference_flame(folder: Path, tps: int | None) -> list[tuple]:
    """Rows of a flame_csv folder, read plainly: layers re-based to 0 in file-name order, row i of a
    file is token i, the non-zero scores ordered highest first (stable), renormalised."""
    files = sorted(folder.glob("layer_*.csv"), key=lambda p: int(p.stem.split("_")[1]))
    rows = []
    for layer, file in enumerate(files):
        lines = re.split(r"\r\n|\r|\n", file.read_bytes().decode("utf-8"))
        if lines[-1] == "":
            lines.pop()
        names = [c.strip() for c in lines[0].split(",")]
        expert_cols = [i for i, c in enumerate(names) if c.startswith("expert_")]
        for r, line in enumerate(lines[1:]):
            cells = line.split(",")
            scores = np.array([float(cells[i].strip()) for i in expert_cols])
            order = np.argsort(-scores, kind="stable")[: int((scores != 0).sum())]
            weights = (scores[order] / scores[order].sum()).astype(np.float32)
            rows.append((r // tps if tps else 0, r % tps if tps else r, layer, order.tolist(), weights.tolist()))
    return rows


@FUZZ
@given(flame_folders())
def test_fuzz_flame_csv(case: tuple[dict[str, bytes], int | None, bool]) -> None:
    files, tps, damaged = case
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folder = work / "flame"
        folder.mkdir()
        for name, data in files.items():
            (folder / name).write_bytes(data)
        traces, error = attempt(LogsParams(format="flame_csv", path=str(folder), tokens_per_sequence=tps), work)
        if error is not None:
            assert damaged, f"undamaged CSVs were refused: {error}"
            names_where(error, str(folder), r"layer gap|empty file|layer_<N>\.csv|no header|not UTF-8|expected columns"
                                            r"|expert columns|extract\.logs\.path")
            return
        assert traces is not None
        expected = reference_flame(folder, tps)
        got = list(zip(traces.seq_id.tolist(), traces.token_pos.tolist(), traces.layer.tolist(),
                       traces.experts.tolist()))
        assert got == [r[:4] for r in expected]
        np.testing.assert_allclose(traces.weights, [r[4] for r in expected], rtol=1e-6)


# --------------------------------------------------------------------------- vllm_npy

INT_TYPES = [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64]


@st.composite
def vllm_arrays(draw: st.DrawFn) -> tuple[list[np.ndarray], bool, bool]:
    """(arrays [seq_len, num_layers, k] per sequence, as one .npz or not, whether damaged)."""
    n_layers, k = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    num_experts = draw(st.integers(k, 6))
    dtype = draw(st.sampled_from(INT_TYPES))
    damaged = False
    arrays = []
    for i in range(draw(st.integers(1, 3))):
        T = draw(st.integers(1 if i == 0 else 0, 4))  # empty sequences are allowed, not an empty log
        a = np.array([[draw(st.permutations(range(num_experts)))[:k] for _ in range(n_layers)] for _ in range(T)],
                     dtype=dtype).reshape(T, n_layers, k)
        if T and draw(st.booleans()):
            damaged = True
            info = np.iinfo(dtype)
            value = draw(st.sampled_from([v for v in (-1, 2**15, 40_000, 2**31, 2**63, int(info.max), 0)
                                          if info.min <= v <= info.max]))
            a[draw(st.integers(0, T - 1)), draw(st.integers(0, n_layers - 1)), draw(st.integers(0, k - 1))] = value
        if draw(st.integers(0, 9)) == 0:
            damaged = True
            a = draw(st.sampled_from([a.astype(np.float32), a.astype(bool), a.reshape(T, n_layers * k), a[..., :1]]))
        arrays.append(a)
    return arrays, draw(st.booleans()), damaged


@FUZZ
@given(vllm_arrays(), st.data())
def test_fuzz_vllm_npy(case: tuple[list[np.ndarray], bool, bool], data: st.DataObject) -> None:
    arrays, as_npz, damaged = case
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if as_npz:
            path = work / "routed.npz"
            np.savez(path, **{f"req{i:02d}": a for i, a in enumerate(arrays)})
            files = [path]
        else:
            path = work / "routed"
            path.mkdir()
            for i, a in enumerate(arrays):
                np.save(path / f"seq_{i:03d}.npy", a)
            files = sorted(path.iterdir())
        if data.draw(st.integers(0, 4)) == 0:  # bytes damaged in one file
            damaged = True
            file = data.draw(st.sampled_from(files))
            file.write_bytes(damaged_bytes(data.draw, file.read_bytes(), span=40, max_new=3))
        traces, error = attempt(LogsParams(format="vllm_npy", path=str(path)), work)
        if error is not None:
            assert damaged, f"undamaged arrays were refused: {error}"
            names_where(error, str(path), r"cannot read|expected|differs|not a routing shape|no routed tokens"
                                          r"|not an \.npz|layer gap|empty \.npz")
            return
        assert traces is not None
        if as_npz:
            with np.load(path) as npz:
                loaded = [npz[key] for key in npz.files]
        else:
            loaded = [np.load(f) for f in files]
        expected = [(s, t, layer, a[t, layer].tolist()) for s, a in enumerate(loaded)
                    for t in range(a.shape[0]) for layer in range(a.shape[1])]
        got = list(zip(traces.seq_id.tolist(), traces.token_pos.tolist(), traces.layer.tolist(),
                       traces.experts.tolist()))
        assert got == expected
        assert traces.meta.num_experts == max(max(r[3]) for r in expected) + 1
        np.testing.assert_array_equal(traces.weights, np.float32(1.0 / traces.meta.top_k))


# --------------------------------------------------------------------------- parquet


@st.composite
def parquet_tables(draw: st.DrawFn) -> tuple[pa.Table, bool]:
    """(a trace table, perhaps with other integer and list types, perhaps damaged; whether damaged)."""
    n_seq, n_tok, n_layers = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    k = draw(st.integers(1, 3))
    num_experts = draw(st.integers(k, 5))
    rows = [(s, t, layer) for s in range(n_seq) for t in range(n_tok) for layer in range(n_layers)]
    experts = [draw(st.permutations(range(num_experts)))[:k] for _ in rows]
    weights = [[1.0 / k] * k for _ in rows]
    int_type = draw(st.sampled_from([pa.int16(), pa.int32(), pa.int64(), pa.uint32(), pa.float64()]))
    columns = {"seq_id": [r[0] for r in rows], "token_pos": [r[1] for r in rows], "layer": [r[2] for r in rows]}
    damaged = False
    meta = TraceMeta(num_layers=n_layers, num_experts=num_experts, top_k=k, source="fuzz").to_metadata()
    for _ in range(draw(st.integers(0, 2))):
        damaged = True
        kind = draw(st.sampled_from(["value", "expert", "weight", "meta", "repeat"]))
        i = draw(st.integers(0, len(rows) - 1))
        if kind == "value":
            name = draw(st.sampled_from(sorted(columns)))
            columns[name][i] = draw(st.sampled_from([-1, 2**15, 2**31, 3_000_000_000, None]))
        elif kind == "expert":
            experts[i] = [draw(st.sampled_from([-1, 40_000, num_experts, 2**31]))] + experts[i][1:]
        elif kind == "weight":
            weights[i] = [draw(st.sampled_from([float("nan"), -0.5, 2.0, 1e39]))] + weights[i][1:]
        elif kind == "meta":
            key = draw(st.sampled_from(sorted(meta)))
            meta[key] = draw(st.sampled_from([b"x", b"-1", b"40000", b"0", b"{]"]))
        else:
            for values in (*columns.values(), experts, weights):
                values.append(values[i])
    fixed = draw(st.booleans())
    table = pa.table({
        **{name: int_column(values, int_type) for name, values in columns.items()},
        "experts": pa.array(experts, pa.list_(pa.int64(), k) if fixed else pa.list_(pa.int64())),
        "weights": pa.array(weights, pa.list_(pa.float64(), k) if fixed else pa.list_(pa.float64())),
    }).replace_schema_metadata(meta)
    return table, damaged


def int_column(values: list, wanted: pa.DataType) -> pa.Array:
    """`values` as the `wanted` type, or the first wider one that holds them."""
    for dtype in (wanted, pa.int64(), pa.float64()):
        try:
            return pa.array(values, dtype)
        except (pa.ArrowInvalid, OverflowError):
            continue
    raise AssertionError(values)


@FUZZ
@given(parquet_tables(), st.data())
def test_fuzz_parquet(case: tuple[pa.Table, bool], data: st.DataObject) -> None:
    table, damaged = case
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        path = work / "in.parquet"
        pq.write_table(table, path)
        if data.draw(st.integers(0, 4)) == 0:  # bytes damaged
            damaged = True
            path.write_bytes(damaged_bytes(data.draw, path.read_bytes(), span=40, max_new=3))
        traces, error = attempt(LogsParams(format="parquet", path=str(path)), work)
        if error is not None:
            assert damaged, f"an undamaged trace was refused: {error}"
            names_where(error, str(path), r"not a Parquet file|metadata|bad trace shape|missing column|cannot read"
                                          r"|layer gap|no rows")
            return
        assert traces is not None
        source = pq.read_table(path)
        for name in ("seq_id", "token_pos", "layer"):
            assert traces.__getattribute__(name).tolist() == source.column(name).to_pylist()
        assert traces.experts.tolist() == source.column("experts").to_pylist()
        np.testing.assert_allclose(traces.weights, source.column("weights").to_pylist(), rtol=1e-6)


def test_the_fuzzers_damage_inputs_and_keep_them_whole() -> None:
    """The strategies produce both kinds of input (else the properties above test little)."""
    quick = settings(database=None, derandomize=True, max_examples=200)
    for strategy in (jsonl_logs(), flame_folders(), vllm_arrays(), parquet_tables()):
        for damaged in (True, False):
            assert find(strategy, lambda case, damaged=damaged: case[-1] is damaged, settings=quick)[-1] is damaged
