"""What the trace and the samples share: a metadata dataclass kept in Parquet's key-value
metadata, and a dataclass of NumPy columns that rows can be taken from."""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from routecast.errors import InputError

T = TypeVar("T")


def meta_to_parquet(meta: Any) -> dict[bytes, bytes]:
    """Every field of `meta` as a Parquet key-value pair (dicts and tuples as JSON)."""
    out = {}
    for f in dataclasses.fields(meta):
        value = getattr(meta, f.name)
        as_json = isinstance(value, (dict, tuple, list))
        text = json.dumps(value, sort_keys=True, default=str) if as_json else str(value)
        out[f.name.encode()] = text.encode()
    return out


def meta_from_parquet(cls: type[T], metadata: dict[bytes, bytes] | None, where: str,
                      error: type[Exception] = InputError) -> T:
    """`cls` rebuilt from Parquet key-value metadata; a missing key without a default, or a bad
    value, raises `error` naming `where` and the key."""
    metadata = metadata or {}
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        raw = metadata.get(f.name.encode())
        if raw is None:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise error(f"{where}: Parquet metadata lacks {f.name!r}; was the file written by routecast?")
            continue
        try:
            text = raw.decode()
            tp = typing.get_origin(hints[f.name]) or hints[f.name]
            if tp is bool:
                if text not in ("True", "False"):
                    raise ValueError(f"expected True or False, got {text!r}")
                value = text == "True"
            else:
                value = json.loads(text) if tp in (dict, tuple) else tp(text)
        except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
            raise error(f"{where}: bad Parquet metadata {f.name!r}: {exc}") from None
        if tp is dict and not isinstance(value, dict):
            raise error(f"{where}: bad Parquet metadata {f.name!r}: not a JSON object")
        if tp is tuple:
            if not isinstance(value, list) or not all(isinstance(v, int) for v in value):
                raise error(f"{where}: bad Parquet metadata {f.name!r}: not a JSON list of integers")
            value = tuple(value)
        kwargs[f.name] = value
    try:
        return cls(**kwargs)
    except error as exc:
        raise error(f"{where}: {exc}") from None


class ParquetMeta:
    """A metadata dataclass kept in a Parquet file's key-value metadata; bad metadata raises `error`."""

    error: typing.ClassVar[type[Exception]] = InputError

    def to_metadata(self) -> dict[bytes, bytes]:
        return meta_to_parquet(self)

    @classmethod
    def from_metadata(cls: type[T], metadata: dict[bytes, bytes] | None, where: str) -> T:
        return meta_from_parquet(cls, metadata, where, cls.error)  # type: ignore[attr-defined]


def open_parquet(path: str | Path, made_by: str, error: type[Exception] = InputError) -> pq.ParquetFile:
    """The Parquet file at `path`; a missing file names the stage that makes it, an unreadable one
    raises `error` naming the file (never a pyarrow traceback)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found (run {made_by} first: dvc repro {made_by})")
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise error(f"{path}: not a Parquet file: {exc}") from None


@dataclass
class KeyedRows:
    """NumPy columns of rows keyed by (sequence, token, layer), with the metadata describing them:
    the base of the trace (`routecast.data.traces.Traces`) and the samples (`routecast.data.features.Features`)."""

    meta: Any
    seq_id: np.ndarray  # int32 [N]
    token_pos: np.ndarray  # int32 [N]
    layer: np.ndarray  # int16 [N]

    def __len__(self) -> int:
        return len(self.seq_id)

    def take(self: T, index: np.ndarray) -> T:
        """Rows `index` (an integer array or boolean mask)."""
        return take_rows(self, index)


def take_rows(columns: T, index: np.ndarray, **changes: Any) -> T:
    """The rows `index` (integers or a mask) of every NumPy column of the dataclass `columns`
    (the fields in `changes` are set to their new values instead)."""
    taken = {f.name: getattr(columns, f.name)[index] for f in dataclasses.fields(columns)
             if isinstance(getattr(columns, f.name), np.ndarray) and f.name not in changes}
    return dataclasses.replace(columns, **taken, **changes)
