"""Typed loading and validation of `params.yaml`.

Every stage reads its parameters through `load_params`, which parses YAML 1.2 with ruamel.yaml
(so `dvc exp run -S tuned.lr=1e-6`, written by DVC as `1e-06`, is a float, not a string),
checks every key against the dataclasses below and raises one `ParamsError` that names the
first bad key before any work starts. `write_tuned` rewrites the `tuned:` block in place,
keeping comments and layout.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq

from routecast.artifacts import atomic_write_text


class ParamsError(ValueError):
    """A parameter is missing, unknown, of the wrong type or out of range."""

    def __init__(self, key: str, message: str, source: str = "params.yaml") -> None:
        super().__init__(f"{source}: {key}: {message}")
        self.key = key


def _check(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ParamsError(key, message)


# --------------------------------------------------------------------------- blocks


@dataclass(frozen=True)
class ModelParams:
    """One MLP configuration (`baseline:` or `tuned:`)."""

    lr: float
    layer_emb: int
    expert_emb: int
    architecture: list[int]
    dropout: float

    def validate(self, key: str) -> None:
        _check(self.lr > 0 and math.isfinite(self.lr), f"{key}.lr", f"must be > 0, got {self.lr}")
        _check(self.layer_emb >= 1, f"{key}.layer_emb", f"must be >= 1, got {self.layer_emb}")
        _check(self.expert_emb >= 1, f"{key}.expert_emb", f"must be >= 1, got {self.expert_emb}")
        _check(len(self.architecture) > 0, f"{key}.architecture", "must list at least one hidden width")
        for i, width in enumerate(self.architecture):
            _check(width >= 1, f"{key}.architecture[{i}]", f"must be >= 1, got {width}")
        _check(0.0 <= self.dropout < 1.0, f"{key}.dropout", f"must be in [0, 1), got {self.dropout}")


@dataclass(frozen=True)
class SyntheticParams:
    """The seeded synthetic generator (see `routecast.synthetic`)."""

    num_sequences: int = 64
    tokens_per_sequence: int = 256
    num_layers: int = 32
    num_experts: int = 8
    top_k: int = 2
    num_types: int = 32
    shared_weight: float = 0.3
    type_concentration: float = 0.05
    spec_noise: float | None = None
    seed: int = 0

    def validate(self, key: str) -> None:
        for name in ("num_sequences", "tokens_per_sequence", "num_types"):
            _check(getattr(self, name) >= 1, f"{key}.{name}", f"must be >= 1, got {getattr(self, name)}")
        _check(self.num_layers >= 2, f"{key}.num_layers", f"must be >= 2, got {self.num_layers}")
        _check(self.num_experts >= 2, f"{key}.num_experts", f"must be >= 2, got {self.num_experts}")
        _check(1 <= self.top_k <= self.num_experts, f"{key}.top_k",
               f"must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        _check(0.0 <= self.shared_weight <= 1.0, f"{key}.shared_weight", f"must be in [0, 1], got {self.shared_weight}")
        _check(self.type_concentration > 0, f"{key}.type_concentration",
               f"must be > 0, got {self.type_concentration}")
        _check(self.spec_noise is None or self.spec_noise >= 0, f"{key}.spec_noise",
               f"must be >= 0 or null, got {self.spec_noise}")


@dataclass(frozen=True)
class ExtractParams:
    source: Literal["synthetic"] = "synthetic"
    synthetic: SyntheticParams = field(default_factory=SyntheticParams)

    def validate(self, key: str) -> None:
        self.synthetic.validate(f"{key}.synthetic")


@dataclass(frozen=True)
class FeaturesParams:
    lookahead: int = 1
    history_len: int | None = None  # None: the number of layers
    position_scale: float = 2048.0

    def validate(self, key: str) -> None:
        _check(self.lookahead >= 1, f"{key}.lookahead", f"must be >= 1, got {self.lookahead}")
        _check(self.history_len is None or self.history_len >= 1, f"{key}.history_len",
               f"must be >= 1 or null, got {self.history_len}")
        _check(self.position_scale > 0, f"{key}.position_scale", f"must be > 0, got {self.position_scale}")


@dataclass(frozen=True)
class SplitParams:
    test_fraction: float = 0.05
    val_fraction: float = 0.1
    by: Literal["sequence", "random"] = "sequence"
    seed: int = 0

    def validate(self, key: str) -> None:
        _check(0 < self.test_fraction < 1, f"{key}.test_fraction", f"must be in (0, 1), got {self.test_fraction}")
        _check(0 < self.val_fraction < 1, f"{key}.val_fraction", f"must be in (0, 1), got {self.val_fraction}")


@dataclass(frozen=True)
class TrainParams:
    epochs: int = 30
    batch_size: int = 512
    optimizer: Literal["adamw"] = "adamw"
    weight_decay: float = 0.01
    lr_patience: int = 2
    lr_factor: float = 0.5
    early_stopping_patience: int = 5
    threads: int | None = None  # None: every core
    seed: int = 0

    def validate(self, key: str) -> None:
        _check(self.epochs >= 1, f"{key}.epochs", f"must be >= 1, got {self.epochs}")
        _check(self.batch_size >= 2, f"{key}.batch_size", f"must be >= 2 (BatchNorm), got {self.batch_size}")
        _check(self.weight_decay >= 0, f"{key}.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(self.lr_patience >= 0, f"{key}.lr_patience", f"must be >= 0, got {self.lr_patience}")
        _check(0 < self.lr_factor < 1, f"{key}.lr_factor", f"must be in (0, 1), got {self.lr_factor}")
        _check(self.early_stopping_patience >= 1, f"{key}.early_stopping_patience",
               f"must be >= 1, got {self.early_stopping_patience}")
        _check(self.threads is None or self.threads >= 1, f"{key}.threads", f"must be >= 1 or null, got {self.threads}")


@dataclass(frozen=True)
class FloatRange:
    low: float
    high: float
    log: bool = False

    def validate(self, key: str) -> None:
        _check(self.low <= self.high, key, f"low ({self.low}) > high ({self.high})")
        _check(not self.log or self.low > 0, f"{key}.low", f"must be > 0 for a log range, got {self.low}")


@dataclass(frozen=True)
class IntRange:
    low: int
    high: int

    def validate(self, key: str) -> None:
        _check(self.low <= self.high, key, f"low ({self.low}) > high ({self.high})")
        _check(self.low >= 1, f"{key}.low", f"must be >= 1, got {self.low}")


@dataclass(frozen=True)
class UnitsRange:
    """Hidden widths: `first` and `later` are [low, high, step]; a later layer is at most the one before."""

    first: list[int]
    later: list[int]

    def validate(self, key: str) -> None:
        for name in ("first", "later"):
            value = getattr(self, name)
            _check(len(value) == 3, f"{key}.{name}", f"must be [low, high, step], got {value}")
            low, high, step = value
            _check(low >= 1 and step >= 1, f"{key}.{name}", f"low and step must be >= 1, got {value}")
            _check(low <= high, f"{key}.{name}", f"low ({low}) > high ({high})")


@dataclass(frozen=True)
class SearchSpace:
    lr: FloatRange
    layer_emb: IntRange
    expert_emb: IntRange
    n_layers: IntRange
    units: UnitsRange
    dropout: FloatRange

    def validate(self, key: str) -> None:
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate(f"{key}.{f.name}")
        _check(0 <= self.dropout.low and self.dropout.high < 1, f"{key}.dropout",
               f"must lie in [0, 1), got [{self.dropout.low}, {self.dropout.high}]")


@dataclass(frozen=True)
class TuneParams:
    search_space: SearchSpace
    n_trials: int = 20
    epochs: int = 10
    timeout: float | None = None  # seconds; None: no limit
    sampler: Literal["tpe", "random"] = "tpe"
    pruner: Literal["none", "median"] = "median"
    max_train_samples: int | None = None  # subsample train per trial; None: all
    study_name: str = "routecast"
    storage: str = "data/tune/journal.log"
    seed: int = 0

    def validate(self, key: str) -> None:
        _check(self.n_trials >= 1, f"{key}.n_trials", f"must be >= 1, got {self.n_trials}")
        _check(self.epochs >= 1, f"{key}.epochs", f"must be >= 1, got {self.epochs}")
        _check(self.timeout is None or self.timeout > 0, f"{key}.timeout", f"must be > 0 or null, got {self.timeout}")
        _check(self.max_train_samples is None or self.max_train_samples >= 2, f"{key}.max_train_samples",
               f"must be >= 2 or null, got {self.max_train_samples}")
        _check(bool(self.study_name), f"{key}.study_name", "must not be empty")
        self.search_space.validate(f"{key}.search_space")


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int = 8192

    def validate(self, key: str) -> None:
        _check(self.batch_size >= 1, f"{key}.batch_size", f"must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class Params:
    extract: ExtractParams
    features: FeaturesParams
    split: SplitParams
    baseline: ModelParams
    tuned: ModelParams
    train: TrainParams
    tune: TuneParams
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate(f.name)

    def model(self, name: str) -> ModelParams:
        if name not in ("baseline", "tuned"):
            raise ParamsError(name, "unknown model; expected 'baseline' or 'tuned'")
        return getattr(self, name)


# --------------------------------------------------------------------------- generic builder


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a parsed YAML value to the annotated type `tp`, or raise naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ParamsError as exc:
                errors.append(exc)
        raise errors[0] if len(errors) == 1 else ParamsError(key, f"expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ParamsError(key, f"must be one of {list(choices)}, got {value!r}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ParamsError(key, f"expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ParamsError(key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(key, f"expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(key, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ParamsError(key, f"expected a string, got {value!r}")
        return value
    if tp is dict:
        if not isinstance(value, dict):
            raise ParamsError(key, f"expected a mapping, got {value!r}")
        return dict(value)
    raise TypeError(f"unsupported annotation {tp!r} for {key}")


def _build(cls: type, mapping: Any, key: str) -> Any:
    if not isinstance(mapping, dict):
        raise ParamsError(key or "<top>", f"expected a mapping, got {mapping!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in mapping:
        if name not in fields:
            where = f"{key}.{name}" if key else str(name)
            raise ParamsError(where, f"unknown key (known: {', '.join(fields)})")
    kwargs = {}
    for name, f in fields.items():
        where = f"{key}.{name}" if key else name
        if name in mapping:
            kwargs[name] = _coerce(mapping[name], hints[name], where)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ParamsError(where, "missing")
    return cls(**kwargs)


def _plain(node: Any) -> Any:
    """ruamel's commented containers -> plain dicts and lists."""
    if isinstance(node, dict):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    return node


def _yaml() -> YAML:
    yaml = YAML()  # round-trip, YAML 1.2: `1e-06` is a float
    yaml.preserve_quotes = True
    return yaml


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate `path`; raise `ParamsError` naming the first bad key."""
    path = Path(path)
    try:
        raw = _yaml().load(path.read_text())
    except FileNotFoundError:
        raise ParamsError("<file>", "not found", source=str(path)) from None
    except Exception as exc:  # ruamel's parser errors carry the line
        raise ParamsError("<file>", f"not valid YAML: {exc}", source=str(path)) from None
    try:
        params = _build(Params, _plain(raw or {}), "")
        params.validate()
    except ParamsError as exc:
        raise ParamsError(exc.key, str(exc).split(": ", 2)[-1], source=str(path)) from None
    return params


def write_tuned(config: ModelParams, path: str | Path = "params.yaml") -> None:
    """Replace the values of the `tuned:` block, keeping comments, order and flow style."""
    config.validate("tuned")
    path = Path(path)
    yaml = _yaml()
    doc = yaml.load(path.read_text())
    block = doc.get("tuned")
    if not isinstance(block, CommentedMap):
        block = CommentedMap()
        doc["tuned"] = block
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, list):
            old = block.get(f.name)
            seq = CommentedSeq(value)
            if isinstance(old, CommentedSeq) and old.fa.flow_style():
                seq.fa.set_flow_style()
            value = seq
        block[f.name] = value
    import io

    buf = io.StringIO()
    yaml.dump(doc, buf)
    atomic_write_text(path, buf.getvalue())
