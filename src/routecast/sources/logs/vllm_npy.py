"""`vllm_npy`: vLLM `routed_experts` arrays `[seq_len, num_layers, k]`: one `.npy` per sequence
(a file, directory or glob) or one `.npz` holding one array per sequence.

Streamed a chunk at a time: memory holds one chunk (CHUNK_ROWS rows) of a memory-mapped .npy,
or one sequence of an .npz.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from routecast.config.params import LogsParams
from routecast.data.traces import SHAPE_LIMIT, TraceError, TraceMeta, TraceWriter
from routecast.sources.logs.common import CHUNK_ROWS, input_files, log_report, source_params


@dataclass(frozen=True)
class _TokenLayer:
    """Names row i of a chunk of a [seq_len, num_layers, k] array starting at token `first`."""

    first: int
    num_layers: int

    def __getitem__(self, i: int) -> str:
        t, layer = divmod(i, self.num_layers)
        return f"token {self.first + t}, layer {layer}"


def _vllm_arrays(params: LogsParams, stack: contextlib.ExitStack) -> list[tuple[str, Callable[[], Any]]]:
    """(label, loader) per sequence, in order: sorted .npy files (memory-mapped), or the arrays of
    one .npz, which stays open (and is closed) with `stack`."""
    files = input_files(params.path, (".npy", ".npz"))
    if len(files) == 1 and files[0].suffix == ".npz":
        archive = _np_load(files[0], str(files[0]))
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise TraceError(f"{files[0]}: not an .npz archive (it holds a single array: name it .npy)")
        stack.enter_context(archive)
        if not archive.files:
            raise TraceError(f"{files[0]}: empty .npz (no arrays)")
        return [(f"{files[0]}[{key!r}]", lambda key=key: archive[key]) for key in archive.files]
    bad = [f for f in files if f.suffix != ".npy"]
    if bad:
        raise TraceError(f"{bad[0]}: expected .npy files (one sequence each) or a single .npz")
    return [(str(f), lambda f=f: np.load(f, mmap_mode="r", allow_pickle=False)) for f in files]


def _np_load(path: Path, label: str) -> Any:
    try:
        return np.load(path, allow_pickle=False)
    except Exception as exc:  # numpy raises many types on a corrupt file (ValueError, OSError, EOFError, ...)
        raise _unreadable(label, exc) from None


def _unreadable(label: str, exc: Exception) -> TraceError:
    """numpy's own message when it meets pickled data suggests loading it unsafely: never say that."""
    if "pickle" in str(exc).lower():
        return TraceError(f"{label}: cannot read: not a NumPy array file of integers (numpy would have to unpickle "
                          "it, which is never done: save the routed experts as an integer array)")
    return TraceError(f"{label}: cannot read: {exc}")


def import_vllm_npy(params: LogsParams, out: Path) -> dict[str, Any]:
    """vLLM `routed_experts` [seq_len, num_layers, k] per sequence; no weights -> uniform 1/k.

    vLLM's top-k kernels list the chosen experts in descending score order, so the first entry
    is taken as the primary expert; the gate weights are not recorded, so every weight is 1/k.
    The expert count is inferred (largest id + 1) by the writer unless `num_experts` is set.
    """
    rows = 0
    with contextlib.ExitStack() as stack:
        arrays = _vllm_arrays(params, stack)
        writer, shape = None, None
        for seq, (label, load) in enumerate(tqdm(arrays, desc="import vllm_npy", unit="seq")):
            try:
                a = load()
            except Exception as exc:  # as in _np_load
                raise _unreadable(label, exc) from None
            if not isinstance(a, np.ndarray) or a.ndim != 3:
                if isinstance(a, np.lib.npyio.NpzFile):  # an .npz named .npy
                    a.close()
                got = list(a.shape) if isinstance(a, np.ndarray) else type(a).__name__
                raise TraceError(f"{label}: expected [seq_len, num_layers, k], got shape {got}")
            if not np.issubdtype(a.dtype, np.integer):
                raise TraceError(f"{label}: expected integer expert ids, got dtype {a.dtype}")
            if shape is not None and a.shape[1:] != shape:
                raise TraceError(f"{label}: shape [*, {a.shape[1]}, {a.shape[2]}] differs from the first array's "
                                 f"[*, {shape[0]}, {shape[1]}] (num_layers and k must be constant)")
            shape = a.shape[1:]
            num_layers, k = shape
            if writer is None:
                writer = stack.enter_context(_vllm_writer(params, out, num_layers, k, len(arrays), label))
            step = max(1, CHUNK_ROWS // max(num_layers, 1))
            for t0 in range(0, a.shape[0], step):
                part = np.asarray(a[t0:t0 + step])  # reads this chunk from a memory-mapped .npy
                n = part.shape[0] * num_layers
                writer.write(np.full(n, seq), np.repeat(np.arange(t0, t0 + part.shape[0]), num_layers),
                             np.tile(np.arange(num_layers), part.shape[0]), part.reshape(n, k),
                             np.full((n, k), 1.0 / k, dtype=np.float32), where=label,
                             origin=_TokenLayer(t0, num_layers))
                rows += n
            del a  # let a memory map go before the next
        if rows == 0:
            raise TraceError(f"{params.path}: no routed tokens (every array is empty)")
        assert writer is not None
        stats = writer.finish()
    report = {"sequences": len(arrays), "rows": rows, "tokens": stats["tokens"], "missing_token_layer_rows": 0}
    log_report(params.path, report)
    return report


def _vllm_writer(params: LogsParams, out: Path, num_layers: int, k: int, sequences: int, label: str) -> TraceWriter:
    if not (1 <= num_layers <= SHAPE_LIMIT and 1 <= k <= (params.num_experts or SHAPE_LIMIT)):
        raise TraceError(f"{label}: [*, num_layers={num_layers}, k={k}] is not a routing shape "
                         f"(1 <= k <= num_experts{'=' + str(params.num_experts) if params.num_experts else ''}, "
                         f"at most {SHAPE_LIMIT} layers)")
    meta = TraceMeta(num_layers=num_layers, num_experts=params.num_experts or SHAPE_LIMIT, top_k=k,
                     source=params.model or "import:vllm_npy",
                     source_params=source_params(params, weights="uniform 1/k (vLLM routed_experts has no weights)",
                                                  sequences=sequences))
    return TraceWriter(out, meta, where=str(params.path), infer=() if params.num_experts else ("num_experts",))
