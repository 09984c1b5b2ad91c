"""Typed loading and validation of `params.yaml`.

Every stage reads its parameters through `load_params`, which parses YAML 1.2 with ruamel.yaml
(so `dvc exp run -S baseline.mlp.lr=1e-6`, written by DVC as `1e-06`, is a float, not a string),
checks every key against the dataclasses below (a predictor's knobs against its kind's, from
`routecast.predictors.registry`) and raises one `ParamsError` that names the first bad key before
any work starts. `write_tuned` rewrites the `tuned:` block as DVC's own writer would, keeping every
comment and every other line.
"""

from __future__ import annotations

import dataclasses
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap

from routecast.config.fields import InfFloat, ParamsError, build, check, coerce, field_names, to_plain
from routecast.pipeline.artifacts import atomic_write_text
from routecast.predictors import registry
from routecast.sim.presets import MODELS, PRESETS, EngineNumbers, expert_mb, find_model, layer_mb, slots_from_memory

POSITION_SCALE = 2048.0  # positions past it read as 1.0: the seed's scale, the generator's and the default feature's
# The target key of `features.next_token` among the horizons of the samples and models (FeatureMeta.horizons,
# a model's config.horizons): the next token's experts at this token's layer l. Always last, after every
# layer horizon d >= 1; named "next_token" wherever it is shown (`target_name`).
NEXT_TOKEN = 0


def target_name(d: int) -> str:
    """How a horizon key reads in metrics and logs: "next_token" for NEXT_TOKEN, else the horizon d."""
    return "next_token" if d == NEXT_TOKEN else str(d)


def target_key(d: int) -> str:
    """A target inside a longer name (a validation row's key, a predictions column): h<d>, next_token."""
    return "next_token" if d == NEXT_TOKEN else f"h{d}"


# --------------------------------------------------------------------------- blocks


@dataclass(frozen=True)
class ModelParams:
    """One predictor (`baseline:` or `tuned:`): its kind, and that kind's knobs under the kind's name
    (`tuned: {kind: mixture, mixture: {num_types: 63, ...}}`). Each kind declares its knobs
    (`routecast.predictors.registry`); a block missing takes the kind's defaults. A knob the kind
    does not read is an error that names the kind and the knobs it does read, never a silent no-op."""

    kind: str
    config: Any  # the kind's params dataclass

    @classmethod
    def of(cls, kind: str, **knobs: Any) -> ModelParams:
        return cls(kind, registry.get(kind).params(**knobs))

    @classmethod
    def from_mapping(cls, mapping: Any, key: str) -> ModelParams:
        if not isinstance(mapping, dict):
            raise ParamsError(key, f"expected a mapping, got {mapping!r}")
        if "kind" not in mapping:
            raise ParamsError(f"{key}.kind", f"missing (one of: {', '.join(registry.names())})")
        if not isinstance(mapping["kind"], str):
            raise ParamsError(f"{key}.kind", f"expected a kind's name, got {mapping['kind']!r}")
        kind = registry.get(mapping["kind"], f"{key}.kind")
        knobs = ", ".join(field_names(kind.params))
        for name in mapping:
            if name in ("kind", kind.name):
                continue
            if name in registry.names():
                raise ParamsError(f"{key}.{name}", f"{key}.kind is {kind.name}, which reads only {key}.{kind.name} "
                                  f"({knobs}): drop {key}.{name} (dvc exp run -S '~{key}.{name}') or set "
                                  f"{key}.kind={name}")
            raise ParamsError(f"{key}.{name}", f"unknown key: kind {kind.name} reads {key}.{kind.name}.{{{knobs}}}")
        return cls(kind.name, build(kind.params, mapping.get(kind.name), f"{key}.{kind.name}"))

    def to_plain(self) -> dict[str, Any]:
        return {"kind": self.kind, self.kind: to_plain(self.config)}

    def validate(self, key: str) -> None:
        self.config.validate(f"{key}.{self.kind}")


@dataclass(frozen=True)
class SyntheticParams:
    """The seeded synthetic generator (see `routecast.sources.synthetic`)."""

    num_sequences: int = 64
    tokens_per_sequence: int = 256
    num_layers: int = 32
    num_experts: int = 8
    top_k: int = 2
    num_types: int = 28  # latent token types, hidden from every predictor
    shared_weight: float = 0.3  # weight of the per-layer tables shared by all types
    shared_concentration: float = 0.3  # Dirichlet concentration of the shared tables (small = sharp)
    type_concentration: float = 0.05  # Dirichlet concentration of the per-type tables (small = sharp)
    position_effect: float = 1.0  # spread of the types' position slopes (0: the type prior ignores position)
    route_persistence: float = 0.0  # P(a token routes exactly as the previous one: same type, same experts)
    spec_noise: float | None = None
    seed: int = 0

    def validate(self, key: str) -> None:
        for name in ("num_sequences", "tokens_per_sequence", "num_types"):
            check(getattr(self, name) >= 1, f"{key}.{name}", f"must be >= 1, got {getattr(self, name)}")
        check(self.num_layers >= 2, f"{key}.num_layers", f"must be >= 2, got {self.num_layers}")
        check(self.num_experts >= 2, f"{key}.num_experts", f"must be >= 2, got {self.num_experts}")
        check(1 <= self.top_k <= self.num_experts, f"{key}.top_k",
              f"must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        check(0.0 <= self.shared_weight <= 1.0, f"{key}.shared_weight", f"must be in [0, 1], got {self.shared_weight}")
        check(self.type_concentration > 0, f"{key}.type_concentration",
              f"must be > 0, got {self.type_concentration}")
        check(self.shared_concentration > 0, f"{key}.shared_concentration",
              f"must be > 0, got {self.shared_concentration}")
        check(0.0 <= self.route_persistence < 1.0, f"{key}.route_persistence",
              f"must be in [0, 1), got {self.route_persistence}")
        check(self.position_effect >= 0, f"{key}.position_effect", f"must be >= 0, got {self.position_effect}")
        check(self.spec_noise is None or self.spec_noise >= 0, f"{key}.spec_noise",
              f"must be >= 0 or null, got {self.spec_noise}")


@dataclass(frozen=True)
class LogFields:
    """Field names of a JSON-lines routing log (null `sequence`: one sequence; null `weights`: uniform 1/k)."""

    sequence: str | None = "problem_id"
    token: str = "token_idx"
    layer: str = "layer"
    experts: str = "experts"
    weights: str | None = "gating_probs"

    def validate(self, key: str) -> None:
        names = [v for v in (self.sequence, self.token, self.layer, self.experts, self.weights) if v is not None]
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            check(value is None or value != "", f"{key}.{f.name}", "must not be empty")
        check(len(set(names)) == len(names), key, f"field names must differ, got {names}")


@dataclass(frozen=True)
class LogsParams:
    """Existing routing logs to import (`extract.source: import`, see `routecast.sources.logs`)."""

    format: Literal["jsonl", "flame_csv", "vllm_npy", "parquet", "deepseek_csv"] = "jsonl"
    path: str | None = None  # a file, a directory or a glob (relative to the project root)
    fields: LogFields = field(default_factory=LogFields)  # jsonl only
    num_experts: int | None = None  # null: infer (largest expert id + 1)
    renormalize: bool = False  # rescale each row's weights to sum to 1 (else they must already)
    tokens_per_sequence: int | None = None  # flame_csv: rows per sequence (null: one sequence); jsonl: cut each
    # sequence into chunks of this many tokens (each chunk its own sequence, so a split by sequence has units)
    sequences: list[int] | None = None  # jsonl: import only these sequence ids (null: every one)
    model: str | None = None  # the model that produced the logs, recorded in the trace metadata

    def validate(self, key: str) -> None:
        check(self.path is None or self.path != "", f"{key}.path", "must not be empty")
        self.fields.validate(f"{key}.fields")
        check(self.num_experts is None or self.num_experts >= 1, f"{key}.num_experts",
              f"must be >= 1 or null, got {self.num_experts}")
        check(self.tokens_per_sequence is None or self.tokens_per_sequence >= 1, f"{key}.tokens_per_sequence",
              f"must be >= 1 or null, got {self.tokens_per_sequence}")
        check(self.sequences is None or (len(self.sequences) > 0 and min(self.sequences) >= 0), f"{key}.sequences",
              f"must list sequence ids >= 0, or be null, got {self.sequences}")
        check(self.sequences is None or self.format == "jsonl", f"{key}.sequences",
              f"only the jsonl format filters sequences, not {self.format}")


@dataclass(frozen=True)
class HFParams:
    """A Hugging Face transformers MoE model run over a corpus (`extract.source: hf`, see `routecast.sources.hf`)."""

    model: str | None = None  # a local directory holding config.json, weights and tokenizer
    corpus: str | None = None  # .txt (one document per line), .jsonl or .parquet
    text_column: str = "text"  # .jsonl / .parquet: the field holding the text
    max_tokens: int | None = 100_000  # stop after this many tokens; null: the whole corpus
    max_length: int = 512  # truncate each document to this many tokens
    batch_size: int = 8  # documents per forward pass
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    spec_logits: bool = True  # also record the next layer's router on this layer's router input
    seed: int = 0

    def validate(self, key: str) -> None:
        for name in ("model", "corpus"):
            check(getattr(self, name) is None or getattr(self, name) != "", f"{key}.{name}", "must not be empty")
        check(bool(self.text_column), f"{key}.text_column", "must not be empty")
        check(self.max_tokens is None or self.max_tokens >= 1, f"{key}.max_tokens",
              f"must be >= 1 or null, got {self.max_tokens}")
        check(self.max_length >= 1, f"{key}.max_length", f"must be >= 1, got {self.max_length}")
        check(self.batch_size >= 1, f"{key}.batch_size", f"must be >= 1, got {self.batch_size}")
        check(self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda", "mps"), f"{key}.device",
              f"must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")


@dataclass(frozen=True)
class ExtractParams:
    source: Literal["synthetic", "import", "hf"] = "synthetic"
    synthetic: SyntheticParams = field(default_factory=SyntheticParams)
    logs: LogsParams = field(default_factory=LogsParams)
    hf: HFParams = field(default_factory=HFParams)

    def validate(self, key: str) -> None:
        self.synthetic.validate(f"{key}.synthetic")
        self.logs.validate(f"{key}.logs")
        self.hf.validate(f"{key}.hf")
        if self.source == "import":
            check(self.logs.path is not None, f"{key}.logs.path", "must be set when extract.source is import")
        if self.source == "hf":
            for name in ("model", "corpus"):
                check(getattr(self.hf, name) is not None, f"{key}.hf.{name}", "must be set when extract.source is hf")


@dataclass(frozen=True)
class FeaturesParams:
    # predict the experts at layer l + d for each horizon d (increasing); the first is the main target
    horizons: list[int] = field(default_factory=lambda: [1])
    history_len: int | None = None  # None: the number of layers
    position_scale: float = POSITION_SCALE
    prev_token: bool = False  # add the previous token's top-k at the target layer (decode-order traces only)
    token: bool = False  # add the token (its id, or its text's hash): read by every learned kind and the token table
    next_token: bool = False  # also predict the next token's experts at layer l (given this token up to layer l)

    RENAMED: ClassVar[dict[str, str]] = {
        "lookahead": "replaced by features.horizons (lookahead d is `horizons: [d]`)"}

    @property
    def lookahead(self) -> int:
        """The main horizon: the target of every single-horizon figure (top-2, tune's objective, prefetch)."""
        return self.horizons[0]

    @property
    def targets(self) -> tuple[int, ...]:
        """Every target a fit predicts: the horizons, then NEXT_TOKEN with `next_token`."""
        return tuple(self.horizons) + ((NEXT_TOKEN,) if self.next_token else ())

    def validate(self, key: str) -> None:
        check(len(self.horizons) >= 1, f"{key}.horizons", "must name at least one horizon")
        check(all(d >= 1 for d in self.horizons), f"{key}.horizons", f"must be >= 1, got {self.horizons}")
        check(all(a < b for a, b in zip(self.horizons, self.horizons[1:])), f"{key}.horizons",
              f"must be strictly increasing, got {self.horizons}")
        check(not (self.prev_token and len(self.horizons) > 1), f"{key}.prev_token",
              f"reads the previous token at layer l + the horizon, so it takes one horizon, not {self.horizons}")
        check(not (self.prev_token and self.next_token), f"{key}.prev_token",
              "reads the previous token at layer l + the horizon, so it takes one target: not with features.next_token")
        check(self.history_len is None or self.history_len >= 1, f"{key}.history_len",
              f"must be >= 1 or null, got {self.history_len}")
        check(self.position_scale > 0, f"{key}.position_scale", f"must be > 0, got {self.position_scale}")


@dataclass(frozen=True)
class SplitParams:
    test_fraction: float = 0.05
    val_fraction: float = 0.1
    by: Literal["sequence", "random"] = "sequence"
    seed: int = 0

    def validate(self, key: str) -> None:
        check(0 < self.test_fraction < 1, f"{key}.test_fraction", f"must be in (0, 1), got {self.test_fraction}")
        check(0 < self.val_fraction < 1, f"{key}.val_fraction", f"must be in (0, 1), got {self.val_fraction}")


@dataclass(frozen=True)
class TrainParams:
    epochs: int = 30
    batch_size: int = 512
    optimizer: Literal["adamw"] = "adamw"
    weight_decay: float = 0.01
    lr_patience: int = 2
    lr_factor: float = 0.5
    early_stopping_patience: int = 5
    threads: int | None = None  # None: every usable core
    seed: int = 0
    # the next primary, or the next top-k set (multi-label); auto: primary, or set for a trace without weights
    target: Literal["auto", "primary", "set"] = "auto"
    device: str = "auto"  # auto (cuda when present) | cpu | cuda | cuda:N

    def for_samples(self, weighted: bool, key: str = "train") -> TrainParams:
        """These params with `target` settled for samples of a weighted (or unweighted) trace: auto is
        primary, or set where the trace's experts are unordered sets with no primary."""
        if self.target == "auto":
            return dataclasses.replace(self, target="primary" if weighted else "set")
        check(weighted or self.target == "set", f"{key}.target",
              "primary: this trace has no primary expert (its experts are unordered sets, no gate weights); "
              "use set or auto")
        return self

    def validate(self, key: str) -> None:
        check(self.epochs >= 1, f"{key}.epochs", f"must be >= 1, got {self.epochs}")
        check(self.device in ("auto", "cpu", "cuda") or (self.device.startswith("cuda:") and
                                                          self.device[5:].isdigit()),
              f"{key}.device", f"must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        check(self.batch_size >= 2, f"{key}.batch_size", f"must be >= 2 (BatchNorm), got {self.batch_size}")
        check(self.weight_decay >= 0, f"{key}.weight_decay", f"must be >= 0, got {self.weight_decay}")
        check(self.lr_patience >= 0, f"{key}.lr_patience", f"must be >= 0, got {self.lr_patience}")
        check(0 < self.lr_factor < 1, f"{key}.lr_factor", f"must be in (0, 1), got {self.lr_factor}")
        check(self.early_stopping_patience >= 1, f"{key}.early_stopping_patience",
              f"must be >= 1, got {self.early_stopping_patience}")
        check(self.threads is None or self.threads >= 1, f"{key}.threads", f"must be >= 1 or null, got {self.threads}")


@dataclass(frozen=True)
class SearchSpace:
    """What tune searches: one block per kind, in the kind's own terms (its registry entry's `space`);
    the kinds searched are the blocks present, in their order."""

    kinds: dict[str, Any]  # kind name -> its space dataclass

    @classmethod
    def of(cls, **spaces: Any) -> SearchSpace:
        return cls({name: space if space is not None else registry.get(name).space() for name, space in spaces.items()})

    @classmethod
    def from_mapping(cls, mapping: Any, key: str) -> SearchSpace:
        if not isinstance(mapping, dict) or not mapping:
            raise ParamsError(key, f"expected one block per kind to search (known: {', '.join(registry.names())}), "
                                   f"got {mapping!r}")
        return cls({name: build(registry.get(name, f"{key}.{name}").space, value, f"{key}.{name}")
                    for name, value in mapping.items()})

    def to_plain(self) -> dict[str, Any]:
        return {name: to_plain(space) for name, space in self.kinds.items()}

    def validate(self, key: str) -> None:
        for name, space in self.kinds.items():
            space.validate(f"{key}.{name}")


@dataclass(frozen=True)
class Objective:
    """What tune ranks trials by (`tune.objective`): `main` (the default: validation top-2 at the
    main horizon, set recall on a trace without a primary), one target (a horizon d of
    `features.horizons`, or `next_token`), or a weighted mix, `{1: 0.5, next_token: 0.5}` (weights
    > 0, normalised to sum to 1). Each target's figure is its head's validation top-2 (set recall
    without a primary), at the epoch its training keeps (chosen by the main horizon, as train_full's)."""

    weights: tuple[tuple[int, float], ...] = ()  # (target key: a horizon d or NEXT_TOKEN, weight); (): main

    @classmethod
    def from_mapping(cls, value: Any, key: str) -> Objective:
        def target(name: Any) -> int:
            if name == "next_token":
                return NEXT_TOKEN
            if isinstance(name, str) and name.isdigit():  # a mapping's keys arrive as strings
                name = int(name)
            if isinstance(name, int) and not isinstance(name, bool) and name >= 1:
                return int(name)
            raise ParamsError(key, f"a target is a horizon d >= 1 of features.horizons or next_token, got {name!r}")

        if value is None or value == "main":
            return cls()
        if isinstance(value, dict):
            if not value:
                raise ParamsError(key, "an empty mix: name at least one target with its weight")
            pairs = []
            for name, weight in value.items():
                w = coerce(weight, float, f"{key}.{name}")
                check(w > 0, f"{key}.{name}", f"a weight must be > 0, got {weight!r}")
                pairs.append((target(name), w))
            total = sum(w for _, w in pairs)
            return cls(tuple((d, w / total) for d, w in pairs))
        return cls(((target(value), 1.0),))

    def to_plain(self) -> Any:
        if not self.weights:
            return "main"
        if len(self.weights) == 1:
            return target_name(self.weights[0][0]) if self.weights[0][0] == NEXT_TOKEN else self.weights[0][0]
        return {("next_token" if d == NEXT_TOKEN else d): w for d, w in self.weights}

    def validate(self, key: str) -> None:
        pass  # checked against features.horizons by Params.validate (the targets live there)


@dataclass(frozen=True)
class TuneParams:
    search_space: SearchSpace
    n_trials: int = 20
    epochs: int | None = None  # per trial; None: train.epochs (every trial is full training)
    timeout: float | None = None  # seconds; None: no limit
    sampler: Literal["tpe", "gp", "random"] = "tpe"
    pruner: Literal["hyperband", "median", "none"] = "none"
    max_train_samples: int | None = None  # subsample train per trial; None: all
    study_name: str = "routecast"
    # A journal file, or a database URL (postgresql://user@host/db, postgresql:///?service=NAME)
    # whose password comes from ROUTECAST_DB_PASSWORD, PGPASSWORD, ~/.pgpass or a service file,
    # never from this file.
    storage: str = "data/tune/journal.log"
    seed: int = 0
    objective: Objective = field(default_factory=Objective)  # main | a target | a weighted mix (see Objective)
    # After the search, train the best trial of each kind and the baseline's configuration as
    # train_full does; tuned is the best of them on validation (routecast.fit.selection).
    final_selection: bool = True

    def validate(self, key: str) -> None:
        check(self.n_trials >= 1, f"{key}.n_trials", f"must be >= 1, got {self.n_trials}")
        check(self.epochs is None or self.epochs >= 1, f"{key}.epochs", f"must be >= 1 or null, got {self.epochs}")
        check(self.timeout is None or self.timeout > 0, f"{key}.timeout", f"must be > 0 or null, got {self.timeout}")
        check(self.max_train_samples is None or self.max_train_samples >= 2, f"{key}.max_train_samples",
              f"must be >= 2 or null, got {self.max_train_samples}")
        check(bool(self.study_name), f"{key}.study_name", "must not be empty")
        check(bool(self.storage), f"{key}.storage", "must not be empty")
        from routecast.fit.study_storage import storage_problem  # imported here: it pulls in optuna

        problem = storage_problem(self.storage)
        check(problem is None, f"{key}.storage", str(problem))
        self.search_space.validate(f"{key}.search_space")


@dataclass(frozen=True)
class ExtraTest:
    """A trace the models never trained on, scored by every predictor (`evaluate.extra_tests`)."""

    name: str
    logs: LogsParams  # how to import it (format: parquet for a canonical trace)

    def validate(self, key: str) -> None:
        check(bool(self.name) and self.name.replace("_", "").isalnum(), f"{key}.name",
              f"must be a non-empty identifier (letters, digits, _), got {self.name!r}")
        self.logs.validate(f"{key}.logs")
        check(self.logs.path is not None, f"{key}.logs.path", "must be set")


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int = 8192
    bootstrap: int = 1000  # resamples of the test sequences for the 95% intervals
    seed: int = 0
    extra_tests: list[ExtraTest] = field(default_factory=list)

    def validate(self, key: str) -> None:
        check(self.batch_size >= 1, f"{key}.batch_size", f"must be >= 1, got {self.batch_size}")
        check(self.bootstrap >= 100, f"{key}.bootstrap", f"must be >= 100 resamples, got {self.bootstrap}")
        names = [t.name for t in self.extra_tests]
        for i, test in enumerate(self.extra_tests):
            test.validate(f"{key}.extra_tests[{i}]")
        check(len(set(names)) == len(names), f"{key}.extra_tests", f"names must differ, got {names}")


# --------------------------------------------------------------------------- simulate_prefetch


@dataclass(frozen=True)
class LinkParams:
    gb_per_s: InfFloat | None = None  # null: the preset's; .inf: an infinitely fast link
    # priority: demand fetches first, a prefetch its layer's router did not choose cancelled (real engines);
    # fifo: every transfer in order of issue, never withdrawn (the earlier verdict, kept reproducible)
    queue: Literal["fifo", "priority"] = "priority"
    chunk_mb: float | None = 4.0  # priority: transfers move in chunks of this size; null: whole

    slot_on: Literal["issue", "land"] = "land"  # priority: a prefetch takes its cache slot when issued | when it lands

    def validate(self, key: str) -> None:
        check(self.chunk_mb is None or (math.isfinite(self.chunk_mb) and self.chunk_mb > 0), f"{key}.chunk_mb",
              f"must be > 0 or null, got {self.chunk_mb}")


@dataclass(frozen=True)
class CpuParams:
    """The host CPU computing a missing expert when that ends before its transfer would (Fiddler's
    fallback; the priority link only)."""

    fallback: bool = False  # on: a missing expert runs on the CPU when sooner than its transfer
    gb_per_s: float | None = None  # host memory bandwidth a batch-1 expert streams at; null: the preset's
    ms_per_expert: float | None = None  # or a measured time per expert (wins over gb_per_s)

    def validate(self, key: str) -> None:
        for name in ("gb_per_s", "ms_per_expert"):
            value = getattr(self, name)
            check(value is None or (math.isfinite(value) and value > 0), f"{key}.{name}",
                  f"must be > 0 or null, got {value}")


@dataclass(frozen=True)
class ComputeParams:
    ms_per_layer: float | None = None  # null: the layer's weights (model) over the preset's GPU bandwidth


@dataclass(frozen=True)
class CacheParams:
    expert_gb: float | None = None  # GPU memory for experts, GB; null: the preset's. Slots follow from it
    scope: Literal["layer", "model"] = "layer"  # layer: a cache per layer, alike | model: one budget for every layer
    slots_per_layer: int | None = None  # scope layer; null: as many as expert_gb holds, every layer alike
    slots_total: int | None = None  # scope model; null: as many as expert_gb holds
    # predicted: Belady on the predictor's sets (its later horizons, then its next-token ranking): the expert whose
    # predicted next use is farthest, then the lowest ranked (per layer: the lowest ranked; no ranks: LRU);
    # belady: the clairvoyant bound (evicts by the true future use)
    eviction: Literal["lru", "lfu", "predicted", "belady"] = "lru"


@dataclass(frozen=True)
class PrefetchParams:
    width: int | None = None  # experts prefetched per layer (the predictor's best first); null: the trace's top_k
    # prefetch for layers l + 1 .. l + depth, each from the predictor's ranking for that horizon (features.horizons);
    # a predictor without one there prefetches less deep (metrics: `depth`); > 1 needs link.queue: priority
    depth: int = 1
    # The predictor's own time per call (ms), by predictor name; a name not listed costs 0 (table look-ups).
    predictor_ms: dict = field(default_factory=dict)

    def ms_for(self, name: str) -> float:
        return float(self.predictor_ms.get(name, 0.0))


@dataclass(frozen=True)
class SweepParams:
    """The plots' x values; null: every value in range (at most 16, evenly spaced)."""

    slots: list[int] | None = None  # stall against cache slots (at the configured width)
    width: list[int] | None = None  # hit rate against prefetch width (at the configured slots)


@dataclass(frozen=True)
class SimulateParams:
    """The offloading engine `simulate_prefetch` replays the test split through (see docs/prefetch.md).

    `preset` fills every hardware number left null; a number set here (or with `dvc exp run -S
    simulate.link.gb_per_s=12`) overrides the preset's.
    """

    preset: str | None = "mixtral_bf16_pcie4"
    model: str | None = "auto"  # auto: from the trace's source, else its shape | a known model | null: none
    expert_mb: float | None = None  # null: the model's expert at the preset's precision
    # fetch a missing expert as a copy of this many bits per parameter (HOBBIT); null: at the preset's precision.
    # The quality cost of computing with the copy is not measured. The priority link only
    miss_bits: float | None = None
    link: LinkParams = field(default_factory=LinkParams)
    compute: ComputeParams = field(default_factory=ComputeParams)
    cpu: CpuParams = field(default_factory=CpuParams)
    cache: CacheParams = field(default_factory=CacheParams)
    prefetch: PrefetchParams = field(default_factory=PrefetchParams)
    sweep: SweepParams = field(default_factory=SweepParams)

    def engine_numbers(self, num_layers: int, num_experts: int, top_k: int, source: str = "unknown",
                       key: str = "simulate") -> EngineNumbers:
        """The engine's numbers for a trace of this shape: each explicit one, else from the preset (the
        machine) and the model; raises naming the first that neither gives."""
        machine = PRESETS[self.preset] if self.preset is not None else None
        name = self.model if self.model != "auto" else find_model(source, num_experts, top_k)
        model = MODELS[name] if name is not None else None
        trace = f"the trace ({source!r}, {num_experts} experts, top-{top_k}, {num_layers} layers)"
        why = (f"{key}.preset is null" if machine is None else
               f"{trace} is not a known model: set {key}.model ({', '.join(MODELS)})" if model is None else "")

        def need(value: Any, where: str) -> Any:
            check(value is not None, f"{key}.{where}", f"must be set: {why}")
            return value

        known = machine is not None and model is not None
        one_mb = self.expert_mb if self.expert_mb is not None else need(
            expert_mb(model, machine.expert_bits) if known else None, "expert_mb")
        gb_per_s = self.link.gb_per_s if self.link.gb_per_s is not None else need(
            machine.link_gb_per_s if machine else None, "link.gb_per_s")
        ms_per_layer = self.compute.ms_per_layer if self.compute.ms_per_layer is not None else need(
            layer_mb(model, top_k, machine.expert_bits, machine.dense_bits) / machine.gpu_gb_per_s if known else None,
            "compute.ms_per_layer")
        gb = self.cache.expert_gb if self.cache.expert_gb is not None else machine.expert_gb if machine else None
        total = 0
        if self.cache.scope == "model":
            total = self.cache.slots_total
            if total is None:
                total = min(math.floor(need(gb, "cache.expert_gb") * 1000 / one_mb), num_layers * num_experts)
            check(total >= top_k + 1, f"{key}.cache.slots_total", f"must hold a layer's top_k = {top_k} experts and "
                  f"a prefetch, got {total}")
        slots = num_experts if total else self.cache.slots_per_layer
        if slots is None:
            slots = slots_from_memory(need(gb, "cache.expert_gb"), one_mb, num_layers, num_experts)
            least = 1 if self.cpu.fallback else top_k
            check(slots >= least, f"{key}.cache.expert_gb", f"{gb} GB holds {slots} experts of {one_mb:.1f} MB per "
                  f"layer for {num_layers} layers, fewer than {least}: the engine cannot compute a layer"
                  + ("" if self.cpu.fallback else " (with cpu.fallback the CPU computes what the GPU cannot hold)"))
        cpu_ms = 0.0
        if self.cpu.fallback:
            if self.cpu.ms_per_expert is not None:
                cpu_ms = self.cpu.ms_per_expert
            else:
                cpu_gb = self.cpu.gb_per_s if self.cpu.gb_per_s is not None else machine.cpu_gb_per_s if machine \
                    else None
                check(cpu_gb is not None, f"{key}.cpu.gb_per_s", "must be set (or cpu.ms_per_expert) for "
                      f"cpu.fallback: preset {self.preset} gives no CPU figure")
                cpu_ms = one_mb / cpu_gb
        miss = 1.0
        if self.miss_bits is not None:
            check(machine is not None, f"{key}.miss_bits", "needs a preset: the copy is smaller than its precision")
            check(self.miss_bits < machine.expert_bits, f"{key}.miss_bits", f"must be below the preset's "
                  f"{machine.expert_bits} bits per parameter, got {self.miss_bits}")
            miss = self.miss_bits / machine.expert_bits
        return EngineNumbers(expert_mb=one_mb, gb_per_s=gb_per_s, ms_per_layer=ms_per_layer, slots_per_layer=slots,
                             cpu_ms=cpu_ms, slots_total=total, miss_fraction=miss)

    def validate(self, key: str) -> None:
        check(self.preset is None or self.preset in PRESETS, f"{key}.preset",
              f"unknown preset {self.preset!r} (known: {', '.join(PRESETS)}, or null with every number set)")
        check(self.model in (None, "auto", *MODELS), f"{key}.model",
              f"unknown model {self.model!r} (known: auto, {', '.join(MODELS)}, or null)")
        em = self.expert_mb
        check(em is None or (math.isfinite(em) and em > 0), f"{key}.expert_mb", f"must be > 0 or null, got {em}")
        gb = self.link.gb_per_s
        check(gb is None or gb > 0, f"{key}.link.gb_per_s", f"must be > 0 (.inf: an infinitely fast link), got {gb}")
        self.link.validate(f"{key}.link")
        self.cpu.validate(f"{key}.cpu")
        check(not self.cpu.fallback or self.link.queue == "priority", f"{key}.cpu.fallback",
              "the CPU fallback runs on the priority link: set link.queue: priority")
        mb = self.miss_bits
        check(mb is None or (math.isfinite(mb) and mb > 0), f"{key}.miss_bits", f"must be > 0 or null, got {mb}")
        check(mb is None or self.link.queue == "priority", f"{key}.miss_bits",
              "a lower-precision copy on a miss runs on the priority link: set link.queue: priority")
        ms = self.compute.ms_per_layer
        check(ms is None or (math.isfinite(ms) and ms >= 0), f"{key}.compute.ms_per_layer", f"must be >= 0, got {ms}")
        mem = self.cache.expert_gb
        check(mem is None or (math.isfinite(mem) and mem > 0), f"{key}.cache.expert_gb",
              f"must be > 0 or null, got {mem}")
        slots = self.cache.slots_per_layer
        check(slots is None or slots >= 1, f"{key}.cache.slots_per_layer", f"must be >= 1 or null, got {slots}")
        total = self.cache.slots_total
        check(total is None or total >= 1, f"{key}.cache.slots_total", f"must be >= 1 or null, got {total}")
        check(total is None or self.cache.scope == "model", f"{key}.cache.slots_total",
              "is the shared budget of cache.scope: model (scope layer sets cache.slots_per_layer)")
        check(slots is None or self.cache.scope == "layer", f"{key}.cache.slots_per_layer",
              "is the per-layer cache of cache.scope: layer (scope model sets cache.slots_total)")
        width = self.prefetch.width
        check(width is None or width >= 1, f"{key}.prefetch.width", f"must be >= 1 or null, got {width}")
        check(self.prefetch.depth >= 1, f"{key}.prefetch.depth", f"must be >= 1, got {self.prefetch.depth}")
        check(self.prefetch.depth == 1 or self.link.queue == "priority", f"{key}.prefetch.depth",
              f"{self.prefetch.depth} needs link.queue: priority (the FIFO link prefetches one layer ahead)")
        for name, value in self.prefetch.predictor_ms.items():
            where = f"{key}.prefetch.predictor_ms.{name}"
            check(isinstance(value, (int, float)) and not isinstance(value, bool), where,
                  f"expected a number, got {value!r}")
            check(math.isfinite(value) and value >= 0, where, f"must be >= 0, got {value}")
        for name in ("slots", "width"):
            values = getattr(self.sweep, name)
            if values is not None:
                check(len(values) > 0, f"{key}.sweep.{name}", "must list at least one value (or be null)")
                check(len(set(values)) == len(values), f"{key}.sweep.{name}", f"repeats a value: {values}")

    def check_shape(self, num_layers: int, num_experts: int, top_k: int, source: str = "unknown",
                    key: str = "simulate") -> EngineNumbers:
        """The checks that need the trace's shape (known once the stage reads its input); the engine's numbers."""
        hw = self.engine_numbers(num_layers, num_experts, top_k, source, key)
        shape = f"the trace has {num_experts} experts, top-{top_k}"
        least = 1 if self.cpu.fallback else top_k  # the CPU computes what a layer's cache cannot hold
        check(least <= hw.slots_per_layer <= num_experts, f"{key}.cache.slots_per_layer",
              f"must be in [{'1' if self.cpu.fallback else 'top_k'}, num_experts] = [{least}, {num_experts}] "
              f"({shape}), got {hw.slots_per_layer}")
        width = self.width(top_k, hw.slots_per_layer)
        check(not hw.slots_total or hw.slots_total >= top_k + width, f"{key}.cache.slots_total",
              f"must be >= top_k + prefetch width = {top_k + width} (a layer's experts and its prefetches), "
              f"got {hw.slots_total}")
        check(width <= num_experts, f"{key}.prefetch.width", f"must be <= num_experts ({shape}), got {width}")
        check(width <= hw.slots_per_layer, f"{key}.prefetch.width",
              f"must be <= the cache's {hw.slots_per_layer} slots per layer, got {width}")
        for value in self.sweep.slots or []:
            check(max(top_k, width) <= value <= num_experts, f"{key}.sweep.slots",
                  f"every value must be in [max(top_k, width), num_experts] = [{max(top_k, width)}, {num_experts}], "
                  f"got {value}")
        for value in self.sweep.width or []:
            check(1 <= value <= hw.slots_per_layer, f"{key}.sweep.width",
                  f"every value must be in [1, the cache's slots per layer] = [1, {hw.slots_per_layer}], got {value}")
        return hw

    def width(self, top_k: int, slots: int) -> int:
        """Experts prefetched per layer: as set, else top_k (at most the cache's slots per layer)."""
        return self.prefetch.width if self.prefetch.width is not None else min(top_k, slots)


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
    simulate: SimulateParams = field(default_factory=SimulateParams)

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate(f.name)
        targets = self.features.targets
        for d, _ in self.tune.objective.weights:
            check(d in targets, "tune.objective", f"{target_name(d)} is not a target of features.horizons "
                  f"{list(self.features.horizons)}" + ("" if self.features.next_token else " (next_token needs "
                                                        "features.next_token: true)"))

    def idle_knobs(self) -> list[str]:
        """Knobs set to something that the chosen predictors do not read (valid, but doing nothing for them)."""
        checks = []  # (knob is set, the kinds' flag, what a kind without it misses, what the others do)
        if self.features.token:
            checks.append(("features.token", "reads_token", "does not read the token",
                           "and the token_table reference do"))
        if len(self.features.horizons) > 1:
            checks.append(("features.horizons", "every_horizon", "predicts the first horizon only",
                           "and the references predict every horizon"))
        if self.features.next_token:
            checks.append(("features.next_token", "every_horizon", "does not predict the next token",
                           "and the references predict it"))
        notes = []
        for knob, flag, misses, others in checks:
            for name in ("baseline", "tuned"):
                kind = self.model(name).kind
                if not getattr(registry.get(kind), flag):
                    kinds = ", ".join(sorted(k for k in registry.names() if getattr(registry.get(k), flag)))
                    notes.append(f"{knob}: {name} (kind {kind}) {misses}; the kinds {kinds} {others}")
        if self.simulate.link.queue == "fifo":
            notes.append("simulate.link.chunk_mb, simulate.link.slot_on: not read by the FIFO link (link.queue: fifo "
                         "moves whole experts in order of issue, each taking its slot when issued)")
        sim = self.simulate
        if not sim.cpu.fallback and (sim.cpu.gb_per_s is not None or sim.cpu.ms_per_expert is not None):
            notes.append("simulate.cpu.gb_per_s, simulate.cpu.ms_per_expert: not read while simulate.cpu.fallback is "
                         "false (no expert runs on the CPU)")
        slots_set = sim.cache.slots_per_layer if sim.cache.scope == "layer" else sim.cache.slots_total
        if slots_set is not None and sim.cache.expert_gb is not None:
            knob = "slots_per_layer" if sim.cache.scope == "layer" else "slots_total"
            notes.append(f"simulate.cache.expert_gb: not read: simulate.cache.{knob} sets the slots")
        return notes

    def model(self, name: str) -> ModelParams:
        if name not in ("baseline", "tuned"):
            raise ParamsError(name, "unknown model; expected 'baseline' or 'tuned'")
        return getattr(self, name)


def _plain(node: Any) -> Any:
    """ruamel's commented containers -> plain dicts and lists."""
    if isinstance(node, dict):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    return node


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate `path`; raise `ParamsError` naming the first bad key."""
    path = Path(path)
    try:
        raw = YAML(typ="rt").load(path.read_text())  # YAML 1.2: `1e-06` (as DVC writes it) is a float
    except FileNotFoundError:
        raise ParamsError("<file>", "not found", source=str(path)) from None
    except Exception as exc:  # ruamel's parser errors carry the line
        raise ParamsError("<file>", f"not valid YAML: {exc}", source=str(path)) from None
    try:
        plain = _plain(raw or {})
        _check_sections(plain)
        params = build(Params, plain, "")
        params.validate()
    except ParamsError as exc:
        raise ParamsError(exc.key, str(exc).split(": ", 2)[-1], source=str(path)) from None
    return params


def _check_sections(plain: dict[str, Any]) -> None:
    """A top-level key that is a predictor's knob (`dvc exp run -S +lr=...`) is told where it lives."""
    sections = field_names(Params)
    for name in plain:
        if name in sections:
            continue
        owners = [kind for kind in registry.names() if name in field_names(registry.get(kind).params)]
        if owners:
            tuned = plain.get("tuned", {}).get("kind") if isinstance(plain.get("tuned"), dict) else None
            raise ParamsError(name, f"not a section: {name} is a knob of each predictor (kinds {', '.join(owners)}): "
                                    f"set baseline.mlp.{name} or tuned.<kind>.{name} (tuned.kind is {tuned})")


# --------------------------------------------------------------------------- writing, in DVC's form
# `dvc exp run -S k=v` rewrites params.yaml with ruamel.yaml's round-trip defaults (block lists, an
# empty value for null, 80 columns) after merging the change into the loaded file: mappings in
# place (their comments and flow style kept), every other value reassigned. params.yaml is kept in
# the form that writer leaves as it is, and `write_tuned` writes the same way, so an experiment or
# a tune run changes the lines of the keys it changes and no others (tests/test_params_file.py).


def _dvc_merge(node: CommentedMap, new: dict[str, Any]) -> None:
    """Merge `new` into `node` as DVC does: into mappings in place, a leaf reassigned only where its
    value changed (an unchanged float keeps its spelling), keys absent from `new` removed."""
    for key, value in new.items():
        old = node.get(key)
        if isinstance(old, dict) and isinstance(value, dict):
            _dvc_merge(old, value)
        elif key not in node or not _same(_plain(old), value):
            node[key] = _dvc_value(value)
    for key in [k for k in node if k not in new]:
        del node[key]


def _same(old: Any, new: Any) -> bool:
    return old == new and isinstance(old, bool) == isinstance(new, bool) and isinstance(old, float) == isinstance(
        new, float)


def _block_lists(node: dict) -> None:
    """DVC writes every list back as a new plain list (block style), changed or not."""
    for key, value in node.items():
        if isinstance(value, dict):
            _block_lists(value)
        elif isinstance(value, list):
            node[key] = _plain(value)


def _dvc_value(value: Any) -> Any:
    """A plain value as DVC writes it. A float in e-notation keeps 12 significant digits: ruamel
    re-spells a longer one on every later rewrite (its last digit drifts)."""
    if isinstance(value, float) and "e" in repr(value):
        return float(f"{value:.12g}")
    if isinstance(value, dict):
        return CommentedMap((k, _dvc_value(v)) for k, v in value.items())
    if isinstance(value, list):
        return [_dvc_value(v) for v in value]
    return value


def _last_key(node: CommentedMap) -> tuple[CommentedMap, Any]:
    """The innermost mapping holding the block's last line, and that line's key."""
    key = list(node)[-1] if node else None
    while key is not None and isinstance(node[key], CommentedMap) and node[key]:
        node, key = node[key], list(node[key])[-1]
    return node, key


def write_tuned(config: ModelParams, path: str | Path = "params.yaml") -> None:
    """Replace the `tuned:` block with `config` (its kind and that kind's knobs), keeping every
    comment and every other line of the file as it was."""
    config.validate("tuned")
    path = Path(path)
    doc = YAML(typ="rt").load(path.read_text())
    if not isinstance(doc.get("tuned"), dict):
        doc["tuned"] = CommentedMap()
    end = _last_key(doc["tuned"])
    gap = end[0].ca.items.get(end[1])  # the blank line (and comments) after the block: keep them after it
    _dvc_merge(doc["tuned"], config.to_plain())
    node, key = _last_key(doc["tuned"])
    if gap is not None and key not in node.ca.items:
        node.ca.items[key] = gap
    _block_lists(doc)
    yaml = YAML()
    yaml.default_flow_style = False  # DVC's dumper
    buf = io.StringIO()
    yaml.dump(doc, buf)
    atomic_write_text(path, buf.getvalue())
