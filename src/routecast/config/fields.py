"""The typed builder behind every params block: a parsed YAML mapping -> a frozen dataclass.

`build(cls, mapping, key)` checks every key against the dataclass's fields and converts each value
to its annotation, raising one `ParamsError` that names the first bad key. The search ranges
(`FloatRange`, `IntRange`) live here too, so a predictor kind declares its knobs and its search
space with nothing but this module (see `routecast.predictors.registry`).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from routecast.errors import InputError

INT_MIN, INT_MAX = -(2**63), 2**63 - 1
ALLOW_INF = "allow_inf"
# A float that may be infinite (`.inf` in YAML): every other float must be finite.
InfFloat = Annotated[float, ALLOW_INF]


class ParamsError(InputError):
    """A parameter is missing, unknown, of the wrong type or out of range."""

    def __init__(self, key: str, message: str, source: str = "params.yaml") -> None:
        super().__init__(f"{source}: {key}: {message}")
        self.key = key


def check(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ParamsError(key, message)


@dataclass(frozen=True)
class FloatRange:
    low: float
    high: float
    log: bool = False

    def validate(self, key: str) -> None:
        check(self.low <= self.high, key, f"low ({self.low}) > high ({self.high})")
        check(not self.log or self.low > 0, f"{key}.low", f"must be > 0 for a log range, got {self.low}")

    def clip(self, value: float) -> float:
        return float(min(max(value, self.low), self.high))

    def __contains__(self, value: float) -> bool:
        return self.low <= value <= self.high


@dataclass(frozen=True)
class IntRange:
    low: int
    high: int
    step: int = 1

    def validate(self, key: str) -> None:
        check(self.low <= self.high, key, f"low ({self.low}) > high ({self.high})")
        check(self.low >= 1, f"{key}.low", f"must be >= 1, got {self.low}")
        check(self.step >= 1, f"{key}.step", f"must be >= 1, got {self.step}")

    def clip(self, value: float) -> int:
        """The value of the range (on its step grid) nearest `value`."""
        top = self.low + (self.high - self.low) // self.step * self.step
        return int(min(max(self.low + round((value - self.low) / self.step) * self.step, self.low), top))

    def __contains__(self, value: float) -> bool:
        return self.low <= value <= self.high


def validate_fields(block: Any, key: str) -> None:
    """Validate every field of `block` that validates itself (its ranges, its sub-blocks)."""
    for f in dataclasses.fields(block):
        value = getattr(block, f.name)
        if hasattr(value, "validate"):
            value.validate(f"{key}.{f.name}")


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a parsed YAML value to the annotated type `tp`, or raise naming `key`.

    Every number is checked here, once for all keys: an int must fit in 64 bits, a float must
    be finite (no .inf or .nan: a rate, a bound or a timeout of infinity is a typo) unless its
    annotation is `InfFloat`.
    """
    origin = typing.get_origin(tp)
    if origin is Annotated:
        base, *extras = typing.get_args(tp)
        if base is float and ALLOW_INF in extras:
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isinf(value) and value > 0:
                return math.inf
        return coerce(value, base, key)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key)
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
        return [coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if isinstance(tp, type) and hasattr(tp, "from_mapping"):  # a block that builds itself (kind-dependent)
        return tp.from_mapping(value, key)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ParamsError(key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(key, f"expected an integer, got {value!r}")
        if not INT_MIN <= value <= INT_MAX:  # every int param ends up in a 64-bit slot (or smaller)
            raise ParamsError(key, f"out of range: {value} does not fit in 64 bits")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(key, f"expected a number, got {value!r}")
        try:
            number = float(value)
        except OverflowError:  # an integer beyond float's range
            number = math.inf
        if not math.isfinite(number):  # YAML's .inf / .nan, or 1e400
            raise ParamsError(key, f"must be a finite number, got {value!r}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ParamsError(key, f"expected a string, got {value!r}")
        return value
    if tp is dict:
        if not isinstance(value, dict):
            raise ParamsError(key, f"expected a mapping, got {value!r}")
        return dict(value)
    raise TypeError(f"unsupported annotation {tp!r} for {key}")


def build(cls: type, mapping: Any, key: str) -> Any:
    """The dataclass `cls` from a parsed mapping: unknown keys, missing ones and bad values raise."""
    if mapping is None:  # an empty block (`tuned.mixture:` with nothing under it): every default
        mapping = {}
    if not isinstance(mapping, dict):
        raise ParamsError(key or "<top>", f"expected a mapping, got {mapping!r}")
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in mapping:
        if name not in fields:
            where = f"{key}.{name}" if key else str(name)
            renamed = getattr(cls, "RENAMED", {})  # keys of earlier versions: say what took their place
            raise ParamsError(where, renamed[name] if name in renamed else f"unknown key (known: {', '.join(fields)})")
    kwargs = {}
    for name, f in fields.items():
        where = f"{key}.{name}" if key else name
        if name in mapping:
            kwargs[name] = coerce(mapping[name], hints[name], where)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ParamsError(where, "missing")
    return cls(**kwargs)


def to_plain(config: Any) -> Any:
    """A params dataclass as the plain mapping params.yaml holds (the inverse of `build`)."""
    if hasattr(config, "to_plain"):
        return config.to_plain()
    if dataclasses.is_dataclass(config):
        return {f.name: to_plain(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (list, tuple)):
        return [to_plain(v) for v in config]
    return config
