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

from routecast.pipeline.artifacts import atomic_write_text
from routecast.errors import InputError


POSITION_SCALE = 2048.0  # positions past it read as 1.0: the seed's scale, the generator's and the default feature's


class ParamsError(InputError):
    """A parameter is missing, unknown, of the wrong type or out of range."""

    def __init__(self, key: str, message: str, source: str = "params.yaml") -> None:
        super().__init__(f"{source}: {key}: {message}")
        self.key = key


def _check(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ParamsError(key, message)


# --------------------------------------------------------------------------- blocks


@dataclass(frozen=True)
class GRUParams:
    """The `gru` kind's own knobs (the shared neural ones are in the block above them)."""

    hidden: int = 256  # GRU state width
    emb: int = 32  # width of the (layer, expert) embeddings it reads
    layers: int = 1  # stacked GRU layers
    batch_tokens: int = 128  # tokens per training batch (each is up to num_layers - lookahead samples)

    def validate(self, key: str) -> None:
        for name in ("hidden", "emb", "layers", "batch_tokens"):
            _check(getattr(self, name) >= 1, f"{key}.{name}", f"must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class MixtureParams:
    """The `mixture` kind: a latent-type mixture of per-layer Markov chains fitted by EM."""

    num_types: int = 32  # latent token types
    smoothing: float = 0.1  # pull of each type's tables towards the pooled ones (pseudo-count)
    restarts: int = 3  # EM runs from random starts; the best training likelihood wins
    iterations: int = 200  # EM iterations at most per run

    def validate(self, key: str) -> None:
        for name in ("num_types", "restarts", "iterations"):
            _check(getattr(self, name) >= 1, f"{key}.{name}", f"must be >= 1, got {getattr(self, name)}")
        _check(self.smoothing > 0 and math.isfinite(self.smoothing), f"{key}.smoothing",
               f"must be > 0, got {self.smoothing}")


MODEL_KINDS = ("mlp", "lookup_mlp", "gru", "mixture")


@dataclass(frozen=True)
class ModelParams:
    """One predictor (`baseline:` or `tuned:`): its kind, the neural kinds' shared knobs (the seed's
    MLP fields: lr, embeddings, hidden widths, dropout) and each kind's own block."""

    lr: float
    layer_emb: int
    expert_emb: int
    architecture: list[int]
    dropout: float
    kind: Literal["mlp", "lookup_mlp", "gru", "mixture"] = "mlp"
    gru: GRUParams = field(default_factory=GRUParams)
    mixture: MixtureParams = field(default_factory=MixtureParams)

    def validate(self, key: str) -> None:
        self.gru.validate(f"{key}.gru")
        self.mixture.validate(f"{key}.mixture")
        _check(self.lr > 0 and math.isfinite(self.lr), f"{key}.lr", f"must be > 0, got {self.lr}")
        _check(self.layer_emb >= 1, f"{key}.layer_emb", f"must be >= 1, got {self.layer_emb}")
        _check(self.expert_emb >= 1, f"{key}.expert_emb", f"must be >= 1, got {self.expert_emb}")
        _check(len(self.architecture) > 0, f"{key}.architecture", "must list at least one hidden width")
        for i, width in enumerate(self.architecture):
            _check(width >= 1, f"{key}.architecture[{i}]", f"must be >= 1, got {width}")
        _check(0.0 <= self.dropout < 1.0, f"{key}.dropout", f"must be in [0, 1), got {self.dropout}")


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
            _check(getattr(self, name) >= 1, f"{key}.{name}", f"must be >= 1, got {getattr(self, name)}")
        _check(self.num_layers >= 2, f"{key}.num_layers", f"must be >= 2, got {self.num_layers}")
        _check(self.num_experts >= 2, f"{key}.num_experts", f"must be >= 2, got {self.num_experts}")
        _check(1 <= self.top_k <= self.num_experts, f"{key}.top_k",
               f"must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        _check(0.0 <= self.shared_weight <= 1.0, f"{key}.shared_weight", f"must be in [0, 1], got {self.shared_weight}")
        _check(self.type_concentration > 0, f"{key}.type_concentration",
               f"must be > 0, got {self.type_concentration}")
        _check(self.shared_concentration > 0, f"{key}.shared_concentration",
               f"must be > 0, got {self.shared_concentration}")
        _check(0.0 <= self.route_persistence < 1.0, f"{key}.route_persistence",
               f"must be in [0, 1), got {self.route_persistence}")
        _check(self.position_effect >= 0, f"{key}.position_effect", f"must be >= 0, got {self.position_effect}")
        _check(self.spec_noise is None or self.spec_noise >= 0, f"{key}.spec_noise",
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
            _check(value is None or value != "", f"{key}.{f.name}", "must not be empty")
        _check(len(set(names)) == len(names), key, f"field names must differ, got {names}")


@dataclass(frozen=True)
class LogsParams:
    """Existing routing logs to import (`extract.source: import`, see `routecast.sources.importers`)."""

    format: Literal["jsonl", "flame_csv", "vllm_npy", "parquet"] = "jsonl"
    path: str | None = None  # a file, a directory or a glob (relative to the project root)
    fields: LogFields = field(default_factory=LogFields)  # jsonl only
    num_experts: int | None = None  # null: infer (largest expert id + 1)
    renormalize: bool = False  # rescale each row's weights to sum to 1 (else they must already)
    tokens_per_sequence: int | None = None  # flame_csv: rows per sequence (null: one sequence); jsonl: cut each
    # sequence into chunks of this many tokens (each chunk its own sequence, so a split by sequence has units)
    sequences: list[int] | None = None  # jsonl: import only these sequence ids (null: every one)
    model: str | None = None  # the model that produced the logs, recorded in the trace metadata

    def validate(self, key: str) -> None:
        _check(self.path is None or self.path != "", f"{key}.path", "must not be empty")
        self.fields.validate(f"{key}.fields")
        _check(self.num_experts is None or self.num_experts >= 1, f"{key}.num_experts",
               f"must be >= 1 or null, got {self.num_experts}")
        _check(self.tokens_per_sequence is None or self.tokens_per_sequence >= 1, f"{key}.tokens_per_sequence",
               f"must be >= 1 or null, got {self.tokens_per_sequence}")
        _check(self.sequences is None or (len(self.sequences) > 0 and min(self.sequences) >= 0), f"{key}.sequences",
               f"must list sequence ids >= 0, or be null, got {self.sequences}")
        _check(self.sequences is None or self.format == "jsonl", f"{key}.sequences",
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
            _check(getattr(self, name) is None or getattr(self, name) != "", f"{key}.{name}", "must not be empty")
        _check(bool(self.text_column), f"{key}.text_column", "must not be empty")
        _check(self.max_tokens is None or self.max_tokens >= 1, f"{key}.max_tokens",
               f"must be >= 1 or null, got {self.max_tokens}")
        _check(self.max_length >= 1, f"{key}.max_length", f"must be >= 1, got {self.max_length}")
        _check(self.batch_size >= 1, f"{key}.batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda", "mps"), f"{key}.device",
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
            _check(self.logs.path is not None, f"{key}.logs.path", "must be set when extract.source is import")
        if self.source == "hf":
            for name in ("model", "corpus"):
                _check(getattr(self.hf, name) is not None, f"{key}.hf.{name}", "must be set when extract.source is hf")


@dataclass(frozen=True)
class FeaturesParams:
    lookahead: int = 1
    history_len: int | None = None  # None: the number of layers
    position_scale: float = POSITION_SCALE
    prev_token: bool = False  # add the previous token's top-k at the target layer (decode-order traces only)

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
    threads: int | None = None  # None: every usable core
    seed: int = 0
    target: Literal["primary", "set"] = "primary"  # the next primary, or the next top-k set (multi-label)
    device: str = "auto"  # auto (cuda when present) | cpu | cuda | cuda:N

    def validate(self, key: str) -> None:
        _check(self.epochs >= 1, f"{key}.epochs", f"must be >= 1, got {self.epochs}")
        _check(self.device in ("auto", "cpu", "cuda") or (self.device.startswith("cuda:") and
                                                          self.device[5:].isdigit()),
               f"{key}.device", f"must be auto, cpu, cuda or cuda:N, got {self.device!r}")
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
    """Hidden widths: `first` and `later` are [low, high, step]; a later layer is at most the one before.

    `tuning.suggest_config` draws layer i > 0 from [later.low, min(later.high, width of layer
    i - 1)], so `later.low` must not exceed `first.low`: otherwise a first layer drawn below
    `later.low` is followed by a wider one. (`later.high` above `first.high` is allowed; it is
    capped by the layer before, as is any later width.)
    """

    first: list[int]
    later: list[int]

    def validate(self, key: str) -> None:
        for name in ("first", "later"):
            value = getattr(self, name)
            _check(len(value) == 3, f"{key}.{name}", f"must be [low, high, step], got {value}")
            low, high, step = value
            _check(low >= 1 and step >= 1, f"{key}.{name}", f"low and step must be >= 1, got {value}")
            _check(low <= high, f"{key}.{name}", f"low ({low}) > high ({high})")
        _check(self.later[0] <= self.first[0], f"{key}.later",
               f"low ({self.later[0]}) must be <= first's low ({self.first[0]}): a later layer is at most as wide "
               "as the one before, and a first layer drawn below it would be followed by a wider one")


@dataclass(frozen=True)
class GRUSpace:
    hidden: list[int] = field(default_factory=lambda: [64, 256, 64])  # [low, high, step]
    emb: list[int] = field(default_factory=lambda: [16, 64, 16])  # [low, high, step]

    def validate(self, key: str) -> None:
        for name in ("hidden", "emb"):
            value = getattr(self, name)
            _check(len(value) == 3 and value[0] >= 1 and value[2] >= 1 and value[0] <= value[1], f"{key}.{name}",
                   f"must be [low, high, step] with 1 <= low <= high, got {value}")


@dataclass(frozen=True)
class MixtureSpace:
    num_types: IntRange = field(default_factory=lambda: IntRange(8, 64))
    smoothing: FloatRange = field(default_factory=lambda: FloatRange(0.01, 3.0, log=True))

    def validate(self, key: str) -> None:
        self.num_types.validate(f"{key}.num_types")
        self.smoothing.validate(f"{key}.smoothing")
        _check(self.smoothing.low > 0, f"{key}.smoothing.low", f"must be > 0, got {self.smoothing.low}")


@dataclass(frozen=True)
class SearchSpace:
    """What tune searches: the kind, the neural kinds' shared knobs and each kind's own."""

    lr: FloatRange
    layer_emb: IntRange
    expert_emb: IntRange
    n_layers: IntRange
    units: UnitsRange
    dropout: FloatRange
    kind: list[str] = field(default_factory=lambda: ["mlp"])
    gru: GRUSpace = field(default_factory=GRUSpace)
    mixture: MixtureSpace = field(default_factory=MixtureSpace)

    def validate(self, key: str) -> None:
        _check(len(self.kind) > 0 and len(set(self.kind)) == len(self.kind), f"{key}.kind",
               f"must list distinct kinds, got {self.kind}")
        for i, kind in enumerate(self.kind):
            _check(kind in MODEL_KINDS, f"{key}.kind[{i}]", f"must be one of {list(MODEL_KINDS)}, got {kind!r}")
        for f in dataclasses.fields(self):
            if f.name != "kind":
                getattr(self, f.name).validate(f"{key}.{f.name}")
        _check(0 <= self.dropout.low and self.dropout.high < 1, f"{key}.dropout",
               f"must lie in [0, 1), got [{self.dropout.low}, {self.dropout.high}]")


@dataclass(frozen=True)
class TuneParams:
    search_space: SearchSpace
    n_trials: int = 20
    epochs: int = 10
    timeout: float | None = None  # seconds; None: no limit
    sampler: Literal["tpe", "gp", "random"] = "tpe"
    pruner: Literal["hyperband", "median", "none"] = "median"
    max_train_samples: int | None = None  # subsample train per trial; None: all
    study_name: str = "routecast"
    # A journal file, or a database URL (postgresql://user@host/db, postgresql:///?service=NAME)
    # whose password comes from ROUTECAST_DB_PASSWORD, PGPASSWORD, ~/.pgpass or a service file,
    # never from this file.
    storage: str = "data/tune/journal.log"
    seed: int = 0

    def validate(self, key: str) -> None:
        _check(self.n_trials >= 1, f"{key}.n_trials", f"must be >= 1, got {self.n_trials}")
        _check(self.epochs >= 1, f"{key}.epochs", f"must be >= 1, got {self.epochs}")
        _check(self.timeout is None or self.timeout > 0, f"{key}.timeout", f"must be > 0 or null, got {self.timeout}")
        _check(self.max_train_samples is None or self.max_train_samples >= 2, f"{key}.max_train_samples",
               f"must be >= 2 or null, got {self.max_train_samples}")
        _check(bool(self.study_name), f"{key}.study_name", "must not be empty")
        _check(bool(self.storage), f"{key}.storage", "must not be empty")
        from routecast.fit.study_storage import storage_problem  # imported here: it pulls in optuna

        problem = storage_problem(self.storage)
        _check(problem is None, f"{key}.storage", str(problem))
        self.search_space.validate(f"{key}.search_space")


@dataclass(frozen=True)
class ExtraTest:
    """A trace the models never trained on, scored by every predictor (`evaluate.extra_tests`)."""

    name: str
    logs: LogsParams  # how to import it (format: parquet for a canonical trace)

    def validate(self, key: str) -> None:
        _check(bool(self.name) and self.name.replace("_", "").isalnum(), f"{key}.name",
               f"must be a non-empty identifier (letters, digits, _), got {self.name!r}")
        self.logs.validate(f"{key}.logs")
        _check(self.logs.path is not None, f"{key}.logs.path", "must be set")


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int = 8192
    bootstrap: int = 1000  # resamples of the test sequences for the 95% intervals
    seed: int = 0
    extra_tests: list[ExtraTest] = field(default_factory=list)

    def validate(self, key: str) -> None:
        _check(self.batch_size >= 1, f"{key}.batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.bootstrap >= 100, f"{key}.bootstrap", f"must be >= 100 resamples, got {self.bootstrap}")
        names = [t.name for t in self.extra_tests]
        for i, test in enumerate(self.extra_tests):
            test.validate(f"{key}.extra_tests[{i}]")
        _check(len(set(names)) == len(names), f"{key}.extra_tests", f"names must differ, got {names}")


# --------------------------------------------------------------------------- simulate_prefetch


@dataclass(frozen=True)
class HardwarePreset:
    """The numbers of one offloading setup (docs/prefetch.md#presets gives the public source of each)."""

    expert_mb: float  # one expert's weights, MB (1e6 bytes)
    gb_per_s: float  # effective host-to-GPU bandwidth, GB/s (1e9 bytes per second)
    ms_per_layer: float  # decode compute of one MoE layer at batch 1, its experts resident
    slots_per_layer: int  # experts of each MoE layer the GPU memory holds


PRESETS: dict[str, HardwarePreset] = {
    # Mixtral-8x7B's bf16 experts (3 x 4096 x 14336 x 2 bytes) on an A100 40GB PCIe, over PCIe 4.0 x16.
    "mixtral_bf16_pcie4": HardwarePreset(expert_mb=352.321536, gb_per_s=25.0, ms_per_layer=0.68, slots_per_layer=3),
    # The same experts at ~3 bits (mixtral-offloading's HQQ setting) on a 16 GB PCIe 4.0 x16 GPU (RTX 4080).
    "mixtral_3bit_pcie4": HardwarePreset(expert_mb=66.060288, gb_per_s=25.0, ms_per_layer=0.29, slots_per_layer=4),
    # mixtral-offloading's own demo: the ~3-bit experts on a Colab T4 (16 GB, PCIe 3.0 x16).
    "mixtral_3bit_t4": HardwarePreset(expert_mb=66.060288, gb_per_s=12.0, ms_per_layer=0.64, slots_per_layer=4),
}


@dataclass(frozen=True)
class LinkParams:
    gb_per_s: float | None = None  # null: the preset's; .inf: an infinitely fast link


@dataclass(frozen=True)
class ComputeParams:
    ms_per_layer: float | None = None  # null: the preset's


@dataclass(frozen=True)
class CacheParams:
    slots_per_layer: int | None = None  # null: the preset's
    eviction: Literal["lru", "lfu"] = "lru"


@dataclass(frozen=True)
class PrefetchParams:
    width: int | None = None  # experts prefetched per layer (the predictor's best first); null: the trace's top_k
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
    expert_mb: float | None = None  # null: the preset's
    link: LinkParams = field(default_factory=LinkParams)
    compute: ComputeParams = field(default_factory=ComputeParams)
    cache: CacheParams = field(default_factory=CacheParams)
    prefetch: PrefetchParams = field(default_factory=PrefetchParams)
    sweep: SweepParams = field(default_factory=SweepParams)

    def hardware(self, key: str = "simulate") -> HardwarePreset:
        """The preset's numbers with every explicit one in its place; raises naming a number left unset."""
        preset = PRESETS.get(self.preset) if self.preset is not None else None
        values = {"expert_mb": (self.expert_mb, "expert_mb"), "gb_per_s": (self.link.gb_per_s, "link.gb_per_s"),
                  "ms_per_layer": (self.compute.ms_per_layer, "compute.ms_per_layer"),
                  "slots_per_layer": (self.cache.slots_per_layer, "cache.slots_per_layer")}
        resolved = {}
        for name, (value, where) in values.items():
            if value is None:
                _check(preset is not None, f"{key}.{where}", f"must be set when {key}.preset is null")
                value = getattr(preset, name)
            resolved[name] = value
        return HardwarePreset(**resolved)

    def validate(self, key: str) -> None:
        _check(self.preset is None or self.preset in PRESETS, f"{key}.preset",
               f"unknown preset {self.preset!r} (known: {', '.join(PRESETS)}, or null with every number set)")
        hw = self.hardware(key)
        _check(math.isfinite(hw.expert_mb) and hw.expert_mb > 0, f"{key}.expert_mb", f"must be > 0, got {hw.expert_mb}")
        _check(hw.gb_per_s > 0, f"{key}.link.gb_per_s", f"must be > 0 (.inf: an infinitely fast link), got {hw.gb_per_s}")
        _check(math.isfinite(hw.ms_per_layer) and hw.ms_per_layer >= 0, f"{key}.compute.ms_per_layer",
               f"must be >= 0, got {hw.ms_per_layer}")
        _check(hw.slots_per_layer >= 1, f"{key}.cache.slots_per_layer", f"must be >= 1, got {hw.slots_per_layer}")
        width = self.prefetch.width
        _check(width is None or width >= 1, f"{key}.prefetch.width", f"must be >= 1 or null, got {width}")
        _check(width is None or width <= hw.slots_per_layer, f"{key}.prefetch.width",
               f"must be <= cache.slots_per_layer ({hw.slots_per_layer}): the cache cannot hold more prefetches, got {width}")
        for name, ms in self.prefetch.predictor_ms.items():
            where = f"{key}.prefetch.predictor_ms.{name}"
            _check(isinstance(ms, (int, float)) and not isinstance(ms, bool), where, f"expected a number, got {ms!r}")
            _check(math.isfinite(ms) and ms >= 0, where, f"must be >= 0, got {ms}")
        for name in ("slots", "width"):
            values = getattr(self.sweep, name)
            if values is not None:
                _check(len(values) > 0, f"{key}.sweep.{name}", "must list at least one value (or be null)")
                _check(len(set(values)) == len(values), f"{key}.sweep.{name}", f"repeats a value: {values}")

    def check_shape(self, num_experts: int, top_k: int, key: str = "simulate") -> None:
        """The checks that need the trace's shape (known once the stage reads its input)."""
        hw = self.hardware(key)
        shape = f"the trace has {num_experts} experts, top-{top_k}"
        _check(top_k <= hw.slots_per_layer <= num_experts, f"{key}.cache.slots_per_layer",
               f"must be in [top_k, num_experts] = [{top_k}, {num_experts}] ({shape}), got {hw.slots_per_layer}")
        width = self.width(top_k)
        _check(width <= num_experts, f"{key}.prefetch.width", f"must be <= num_experts ({shape}), got {width}")
        _check(width <= hw.slots_per_layer, f"{key}.prefetch.width",
               f"must be <= cache.slots_per_layer ({hw.slots_per_layer}), got {width} (null means top_k = {top_k})")
        for value in self.sweep.slots or []:
            _check(max(top_k, width) <= value <= num_experts, f"{key}.sweep.slots",
                   f"every value must be in [max(top_k, width), num_experts] = [{max(top_k, width)}, {num_experts}], "
                   f"got {value}")
        for value in self.sweep.width or []:
            _check(1 <= value <= hw.slots_per_layer, f"{key}.sweep.width",
                   f"every value must be in [1, cache.slots_per_layer] = [1, {hw.slots_per_layer}], got {value}")

    def width(self, top_k: int) -> int:
        return self.prefetch.width if self.prefetch.width is not None else top_k


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

    def model(self, name: str) -> ModelParams:
        if name not in ("baseline", "tuned"):
            raise ParamsError(name, "unknown model; expected 'baseline' or 'tuned'")
        return getattr(self, name)


# --------------------------------------------------------------------------- generic builder


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


INT_MIN, INT_MAX = -(2**63), 2**63 - 1


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a parsed YAML value to the annotated type `tp`, or raise naming `key`.

    Every number is checked here, once for all keys: an int must fit in 64 bits, a float must
    be finite (no .inf or .nan anywhere: a rate, a bound or a timeout of infinity is a typo).
    """
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
    yaml.width = 4096  # never re-wrap a long line (a flow mapping with its comment) on write
    # write None as `null` (ruamel's default is an empty value), as the file spells it
    yaml.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
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


def _write_block(block: CommentedMap, config: Any) -> None:
    """Set `block`'s values from the dataclass `config`, keeping each existing value's flow style."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        old = block.get(f.name)
        if dataclasses.is_dataclass(value):
            sub = old if isinstance(old, CommentedMap) else CommentedMap()
            if not isinstance(old, CommentedMap):
                sub.fa.set_flow_style()
            _write_block(sub, value)
            value = sub
        elif isinstance(value, list):
            seq = CommentedSeq(value)
            if isinstance(old, CommentedSeq) and old.fa.flow_style():
                seq.fa.set_flow_style()
            value = seq
        block[f.name] = value


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
    _write_block(block, config)
    import io

    buf = io.StringIO()
    yaml.dump(doc, buf)
    atomic_write_text(path, buf.getvalue())
