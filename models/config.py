"""Config dataclasses of models, tables and training, and their checked construction from dicts.

A run is `RunConfig(dataset, features, model, tables, train)`. Each model has its own config
class (registered in MODEL_CONFIGS by name); `run_config_from_dict` builds the whole tree from
plain dicts (a parsed YAML/TOML file, or a checkpoint manifest) and rejects unknown keys and
wrong types with the accepted ones named, so a bad config fails before any data is read.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Union

from embedding_tables.config import POOLINGS, TableConfig
from embedding_tables.errors import ConfigError
from embedding_tables.methods import method_names
from models.errors import ModelConfigError

DEFAULT_DIM = 16
DCN_STRUCTURES = ("stacked", "parallel")
RETRIEVAL_LOSSES = ("bpr", "sampled_softmax", "full_softmax")
SPARSE_OPTIMIZERS = ("rowwise_adagrad", "sgd")


def _check_layers(model: str, option: str, layers: tuple[int, ...]) -> None:
    if any(width < 1 for width in layers):
        raise ModelConfigError(f"{model}: {option} widths must be >= 1, got {list(layers)}")


def _check_dropout(model: str, dropout: float) -> None:
    if not 0.0 <= dropout < 1.0:
        raise ModelConfigError(f"{model}: dropout must be in [0, 1), got {dropout}")


@dataclass(frozen=True)
class LRConfig:
    """Logistic regression on one-hot ids, multi-hot bags and dense features (a dim-1 table)."""

    name: str = "lr"


@dataclass(frozen=True)
class DLRMConfig:
    """DLRM: bottom MLP on dense features, pairwise dot interaction, top MLP.

    The bottom MLP's last layer is the embedding width (added automatically), so the dense vector
    can take part in the dot interaction.
    """

    name: str = "dlrm"
    bottom_mlp: tuple[int, ...] = (64,)
    top_mlp: tuple[int, ...] = (256, 128)
    dropout: float = 0.0

    def __post_init__(self) -> None:
        _check_layers(self.name, "bottom_mlp", self.bottom_mlp)
        _check_layers(self.name, "top_mlp", self.top_mlp)
        _check_dropout(self.name, self.dropout)


@dataclass(frozen=True)
class DCNConfig:
    """DCN-v2: a cross network and a deep MLP, stacked (cross then deep) or in parallel.

    `low_rank` None uses full-rank cross weights; an int r factors each as U V^T with rank r.
    """

    name: str = "dcn"
    cross_layers: int = 3
    low_rank: int | None = None
    structure: str = "stacked"
    deep_mlp: tuple[int, ...] = (256, 128)
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.cross_layers < 1:
            raise ModelConfigError(f"dcn: cross_layers must be >= 1, got {self.cross_layers}")
        if self.low_rank is not None and self.low_rank < 1:
            raise ModelConfigError(f"dcn: low_rank must be >= 1 or None, got {self.low_rank}")
        if self.structure not in DCN_STRUCTURES:
            raise ModelConfigError(
                f"dcn: unknown structure {self.structure!r}; accepted: {', '.join(DCN_STRUCTURES)}"
            )
        _check_layers(self.name, "deep_mlp", self.deep_mlp)
        _check_dropout(self.name, self.dropout)


@dataclass(frozen=True)
class DeepFMConfig:
    """DeepFM: first-order linear term + factorisation machine + deep MLP, summed as logits."""

    name: str = "deepfm"
    deep_mlp: tuple[int, ...] = (256, 128)
    dropout: float = 0.0

    def __post_init__(self) -> None:
        _check_layers(self.name, "deep_mlp", self.deep_mlp)
        _check_dropout(self.name, self.dropout)


@dataclass(frozen=True)
class DINConfig:
    """DIN: target attention of the candidate item over the user's behaviour sequence.

    `sequence_feature` None takes the schema's sequence feature (it must have exactly one); the
    candidate is the categorical feature whose ids that sequence shares.
    """

    name: str = "din"
    sequence_feature: str | None = None
    attention_mlp: tuple[int, ...] = (64, 32)
    mlp: tuple[int, ...] = (256, 128)
    dropout: float = 0.0

    def __post_init__(self) -> None:
        _check_layers(self.name, "attention_mlp", self.attention_mlp)
        _check_layers(self.name, "mlp", self.mlp)
        _check_dropout(self.name, self.dropout)


@dataclass(frozen=True)
class DAREConfig(DINConfig):
    """DARE (Feng et al. 2024): DIN with decoupled attention and representation embeddings.

    The candidate and its behaviour sequence also read a second table of the candidate's ids
    (`<table>_attention`, the same method and budget, `attention_dim` wide; None: a quarter of
    the item table's width, rounded up to a multiple of 4), used only to compute the attention
    weights; the weights pool the item table's rows, which are all the MLP sees.
    """

    name: str = "dare"
    attention_dim: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.attention_dim is not None and self.attention_dim < 1:
            raise ModelConfigError(
                f"dare: attention_dim must be >= 1 or None, got {self.attention_dim}"
            )


@dataclass(frozen=True)
class TwoTowerConfig:
    """A two-tower retriever: user and item towers, score = dot product of their outputs.

    Empty feature lists take the schema's user / item id columns. Trained on positive examples
    only. The negatives of a batch are its other positives' items plus `uniform_negatives` items
    drawn uniformly from the catalogue (mixed negative sampling; needs an item tower of the item
    id alone, since a drawn item has no other features). `sampled_softmax` scores every positive
    against all of them, L2-normalised towers over `temperature`, each logit minus the log of
    its item's expected count among the negatives (logQ correction); `full_softmax` scores it
    against every catalogue item, no sampling and so no correction (affordable for a catalogue
    of thousands; needs an item tower of the item id alone too); `bpr` pairs each positive with
    one negative drawn from the batch's. `normalize` False makes the softmax losses score raw dot
    products (no normalisation, no temperature), which let MF's norms carry popularity; BPR
    always scores raw dot products. `item_bias` makes the last coordinate of the item vector
    a per-item bias (the user vector's is fixed at 1), so a user with little data still gets the
    items the model found popular. `embedding_l2` adds that weight times the squared norm of
    each positive's looked-up (pooled) embeddings to the loss: the sparse optimisers have no
    weight decay, and an id seen in few batches otherwise keeps whatever norm fitted them.
    `tower_mlp` () is matrix factorisation: each tower is the sum of its features' embeddings.
    """

    name: str = "two_tower"
    user_features: tuple[str, ...] = ()
    item_features: tuple[str, ...] = ()
    tower_mlp: tuple[int, ...] = (64,)
    loss: str = "bpr"
    temperature: float = 0.1
    normalize: bool = True
    uniform_negatives: int = 0
    item_bias: bool = False
    embedding_l2: float = 0.0
    ks: tuple[int, ...] = (10, 50)

    def __post_init__(self) -> None:
        _check_layers(self.name, "tower_mlp", self.tower_mlp)
        if self.embedding_l2 < 0:
            raise ModelConfigError(
                f"{self.name}: embedding_l2 must be >= 0, got {self.embedding_l2}"
            )
        if self.loss not in RETRIEVAL_LOSSES:
            raise ModelConfigError(
                f"{self.name}: unknown loss {self.loss!r}; accepted: {', '.join(RETRIEVAL_LOSSES)}"
            )
        if not self.temperature > 0:
            raise ModelConfigError(f"{self.name}: temperature must be > 0, got {self.temperature}")
        if self.uniform_negatives < 0:
            raise ModelConfigError(
                f"{self.name}: uniform_negatives must be >= 0, got {self.uniform_negatives}"
            )
        if not self.ks or any(k < 1 for k in self.ks):
            raise ModelConfigError(f"{self.name}: ks must be non-empty and >= 1, got {self.ks}")


@dataclass(frozen=True)
class MFConfig(TwoTowerConfig):
    """Matrix factorisation: a two-tower retriever with no tower MLP."""

    name: str = "mf"
    tower_mlp: tuple[int, ...] = ()


ModelConfig = (
    LRConfig | DLRMConfig | DCNConfig | DeepFMConfig | DINConfig | DAREConfig | TwoTowerConfig
)
MODEL_CONFIGS: dict[str, type] = {
    "lr": LRConfig,
    "dlrm": DLRMConfig,
    "dcn": DCNConfig,
    "deepfm": DeepFMConfig,
    "din": DINConfig,
    "dare": DAREConfig,
    "two_tower": TwoTowerConfig,
    "mf": MFConfig,
}


@dataclass(frozen=True)
class TablesConfig:
    """How the embedding tables are derived from the schema.

    One table per categorical feature (a sequence feature reads the table of the feature whose ids
    it shares); `method` unified puts every feature in one shared table. Tables with fewer than
    `compress_min_rows` ids stay `full` (compressing them saves nothing). `options` are options
    of `method` (combine, min_count, ...; or seed, dtype, pooling) for every compressed table,
    each table taking those of its own method (a fallback hash table takes seed but not
    graphhash_variant); `overrides` are TableConfig fields per table name, in the flat form. An
    explicit `tables` list (with `feature_to_table`) replaces the derived tables altogether.
    `dim` None takes the model's width (16; lr uses 1).
    """

    method: str = "full"
    budget: float | int | None = None
    dim: int | None = None
    pooling: str = "mean"
    compress_min_rows: int = 1000
    options: dict[str, Any] = field(default_factory=dict)
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    tables: tuple[TableConfig, ...] = ()
    feature_to_table: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in method_names():
            raise ModelConfigError(
                f"unknown table method {self.method!r}; accepted: {', '.join(method_names())}"
            )
        if self.pooling not in POOLINGS:
            raise ModelConfigError(
                f"unknown pooling {self.pooling!r}; accepted: {', '.join(POOLINGS)}"
            )
        if self.dim is not None and self.dim < 1:
            raise ModelConfigError(f"tables.dim must be >= 1, got {self.dim}")
        if self.compress_min_rows < 0:
            raise ModelConfigError(
                f"tables.compress_min_rows must be >= 0, got {self.compress_min_rows}"
            )
        if self.feature_to_table and not self.tables:
            raise ModelConfigError("tables.feature_to_table needs an explicit tables.tables list")


@dataclass(frozen=True)
class TrainConfig:
    """The batch trainer's settings; defaults suit MovieLens-1M.

    `threads` sets torch's intra-op threads for the run (None keeps torch's default, one per
    core); on a machine shared with other work, 1 avoids stalls of threads waiting for a core.
    """

    batch_size: int = 4096
    epochs: int = 3
    dense_lr: float = 1e-3
    dense_weight_decay: float = 0.0
    sparse_optimizer: str = "rowwise_adagrad"
    sparse_lr: float = 0.1
    sparse_eps: float = 1e-8
    patience: int = 1
    evals_per_epoch: int = 2
    max_steps: int | None = None
    train_rows: int | None = None
    eval_rows: int | None = None
    shuffle: bool = True
    prefetch: int = 4
    seed: int = 0
    threads: int | None = None

    def __post_init__(self) -> None:
        for option in ("batch_size", "epochs", "patience", "evals_per_epoch", "prefetch"):
            if getattr(self, option) < 1:
                raise ModelConfigError(f"train.{option} must be >= 1, got {getattr(self, option)}")
        for option in ("max_steps", "train_rows", "eval_rows", "threads"):
            value = getattr(self, option)
            if value is not None and value < 1:
                raise ModelConfigError(f"train.{option} must be >= 1 or None, got {value}")
        for option in ("dense_lr", "sparse_lr", "sparse_eps"):
            if not getattr(self, option) > 0:
                raise ModelConfigError(f"train.{option} must be > 0, got {getattr(self, option)}")
        if self.dense_weight_decay < 0:
            raise ModelConfigError(
                f"train.dense_weight_decay must be >= 0, got {self.dense_weight_decay}"
            )
        if self.sparse_optimizer not in SPARSE_OPTIMIZERS:
            raise ModelConfigError(
                f"unknown sparse optimizer {self.sparse_optimizer!r}; "
                f"accepted: {', '.join(SPARSE_OPTIMIZERS)}"
            )


@dataclass(frozen=True)
class RunConfig:
    """One training run: data set, the features used (() = all), model, tables, trainer."""

    dataset: str = "movielens-1m"
    features: tuple[str, ...] = ()
    model: ModelConfig = field(default_factory=DCNConfig)
    tables: TablesConfig = field(default_factory=TablesConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def model_config_from_dict(raw: Mapping[str, Any], where: str = "model") -> ModelConfig:
    """The model config named by raw["name"], with the rest of raw as its options."""
    if not isinstance(raw, Mapping):
        raise ModelConfigError(f"{where}: expected a mapping with a 'name', got {raw!r}")
    name = raw.get("name", "dcn")
    if name not in MODEL_CONFIGS:
        raise ModelConfigError(
            f"unknown model {name!r}; accepted: {', '.join(sorted(MODEL_CONFIGS))}"
        )
    return from_dict(MODEL_CONFIGS[name], {**raw, "name": name}, where)


def run_config_from_dict(raw: Mapping[str, Any]) -> RunConfig:
    if not isinstance(raw, Mapping):
        raise ModelConfigError(f"a run config must be a mapping, got {type(raw).__name__}")
    raw = dict(raw)
    model = model_config_from_dict(raw.pop("model", {}) or {})
    config = from_dict(RunConfig, raw, "config")
    return dataclasses.replace(config, model=model)


def train_config_of_run(raw: Mapping[str, Any]) -> TrainConfig:
    """The training options of a run recorded in a checkpoint manifest, read alone: a
    continuation needs only those, and the run's tables may hold options of an older format
    (checkpoint loading reads those leniently)."""
    if not isinstance(raw, Mapping):
        raise ModelConfigError(f"manifest.run: expected a mapping, got {type(raw).__name__}")
    return from_dict(TrainConfig, raw.get("train", {}) or {}, "manifest.run.train")


def to_dict(config: Any) -> Any:
    """A config as plain JSON-able values (tuples become lists; a TableConfig its flat form)."""
    if isinstance(config, TableConfig):
        return to_dict(config.to_fields())
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, tuple | list):
        return [to_dict(value) for value in config]
    if isinstance(config, Mapping):
        return {key: to_dict(value) for key, value in config.items()}
    return config


def table_config_from_dict(
    raw: Mapping[str, Any], where: str, *, strict: bool = True
) -> TableConfig:
    """A TableConfig from its flat form (`TableConfig.from_fields`; `strict` False drops the
    options of other methods that old checkpoint manifests hold)."""
    if not isinstance(raw, Mapping):
        raise ModelConfigError(f"{where}: expected a mapping, got {raw!r}")
    try:
        return TableConfig.from_fields(raw, strict=strict)
    except ConfigError as error:
        raise ModelConfigError(f"{where}: {error}") from error


def from_dict(cls: type, raw: Mapping[str, Any], where: str) -> Any:
    """Build dataclass `cls` from `raw`, converting nested values by the field types."""
    if not isinstance(raw, Mapping):
        raise ModelConfigError(f"{where}: expected a mapping, got {raw!r}")
    if cls is TableConfig:
        return table_config_from_dict(raw, where)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise ModelConfigError(
            f"{where}: unknown option(s) {', '.join(map(repr, unknown))}; "
            f"accepted: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    values = {key: _convert(hints[key], value, f"{where}.{key}") for key, value in raw.items()}
    try:
        return cls(**values)
    except ModelConfigError:
        raise
    except (TypeError, ValueError) as error:
        raise ModelConfigError(f"{where}: {error}") from error


def _convert(annotation: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    arguments = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None:
            if type(None) in arguments:
                return None
            raise ModelConfigError(f"{where}: a value is required, got null")
        if isinstance(value, int) and not isinstance(value, bool) and int in arguments:
            return value
        accepted = [argument for argument in arguments if argument is not type(None)]
        for argument in accepted:
            try:
                return _convert(argument, value, where)
            except ModelConfigError:
                continue
        names = " or ".join(getattr(argument, "__name__", str(argument)) for argument in accepted)
        raise ModelConfigError(f"{where}: expected {names}, got {value!r}")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ModelConfigError(f"{where}: expected a list, got {value!r}")
        item = arguments[0] if arguments else Any
        return tuple(_convert(item, element, f"{where}[{i}]") for i, element in enumerate(value))
    if origin in (dict, Mapping) or annotation is dict:
        if not isinstance(value, Mapping):
            raise ModelConfigError(f"{where}: expected a mapping, got {value!r}")
        item = arguments[1] if len(arguments) == 2 else Any
        return {
            str(key): _convert(item, element, f"{where}.{key}") for key, element in value.items()
        }
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        return from_dict(annotation, value, where)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ModelConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ModelConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ModelConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ModelConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value
