"""What a study runs: a data set, a model, methods x budgets x seeds, and how each cell trains.

Two studies share this shape: the CTR compression grid (`compression_study`, AUC and logloss
of a ranking model) and the retrieval study (`retrieval_study`, recall@20 and NDCG@20 of the
two-tower retriever). Every setting is checked when the config is made, so an unknown method,
a budget outside (0, 1] or a bad size fails before anything runs.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from embtab.compression.errors import StudyConfigError
from embtab.compression.tables import BASELINE, expand_methods
from models.config import (
    DEFAULT_DIM,
    MODEL_CONFIGS,
    DCNConfig,
    ModelConfig,
    TrainConfig,
    TwoTowerConfig,
)
from models.errors import ModelConfigError

CTR_MODELS = ("dcn", "deepfm", "dlrm")
CTR_METHODS = (
    "full",
    "hash",
    "unified",
    "qr_mult",
    "qr_add",
    "qr_concat",
    "collisionless",
    "graphhash",
    "double_graphhash",
)
RETRIEVAL_METHODS = ("full", "hash", "double_hash", "graphhash", "double_graphhash")
BUDGETS = (1.0, 0.5, 0.25, 0.1, 0.01)
RETRIEVAL_BUDGETS = (0.25, 0.1)
SEEDS = (0, 1, 2)
QUICK_BUDGETS = (1.0, 0.1)
QUICK_RETRIEVAL_BUDGETS = (0.1,)
QUICK_SEEDS = (0,)
QUICK_TRAIN_ROWS = 100_000
QUICK_EVAL_ROWS = 50_000
RETRIEVAL_KS = (20,)
# Tables with fewer ids stay full. MovieLens-1M: user_id, item_id and zip_code are compressed;
# synthetic Criteo: the 10 features with >= 10k ids (99.9% of the full tables' bytes).
DEFAULT_COMPRESS_MIN_ROWS = 1000
COMPRESS_MIN_ROWS = {"synthetic-criteo": 10_000, "criteo": 10_000}
# The trainer's settings for every cell: one epoch in batches of 8192, validation once at its
# end (the model is evaluated on the test split in that state). With one epoch a sparse
# learning rate of 0.2 beat the trainer's default 0.05 for full and compressed tables alike
# (measured on MovieLens-1M DCN: full 0.7584 -> 0.7601 test AUC, hash at 0.1 0.6987 -> 0.7159).
STUDY_TRAIN = TrainConfig(batch_size=8192, epochs=1, evals_per_epoch=1, patience=1, sparse_lr=0.2)
# The retriever is the two-tower recipe tuned on MovieLens-1M validation recall@50
# (bench/models_movielens1m.py): full softmax over the catalogue, raw dot products, a per-item
# bias, row-wise Adagrad 0.02; it peaked after half an epoch there, so validation runs twice an
# epoch, up to 10 epochs, stopped when recall@20 has not improved for 2 validations.
RETRIEVAL_MODEL = TwoTowerConfig(
    ks=RETRIEVAL_KS, loss="full_softmax", normalize=False, item_bias=True
)
RETRIEVAL_TRAIN = TrainConfig(
    batch_size=4096, epochs=10, evals_per_epoch=2, patience=2, sparse_lr=0.02
)
DEFAULT_MAX_TABLE_BYTES = 4 * 2**30


@dataclass(frozen=True)
class Cell:
    """One run of the grid: a method at a budget with a seed."""

    method: str
    budget: float
    seed: int

    @property
    def key(self) -> str:
        """Identifies the cell in a results file (what a resumed run skips)."""
        return f"{self.method}@{self.budget:g}#{self.seed}"


@dataclass(frozen=True)
class StudyConfig:
    """One study: which cells, and the model and trainer every cell uses.

    `kind` is "compression" (a CTR model; test AUC and logloss) or "retrieval" (two-tower;
    recall@k and NDCG@k). `compress_min_rows` None takes the data set's default.
    `max_table_bytes` skips a cell whose planned tables would take more (recorded, not fatal).
    """

    kind: str = "compression"
    dataset: str = "movielens-1m"
    model: ModelConfig = field(default_factory=DCNConfig)
    methods: tuple[str, ...] = CTR_METHODS
    budgets: tuple[float, ...] = BUDGETS
    seeds: tuple[int, ...] = SEEDS
    dim: int = DEFAULT_DIM
    compress_min_rows: int | None = None
    train: TrainConfig = STUDY_TRAIN
    max_table_bytes: int = DEFAULT_MAX_TABLE_BYTES
    quick: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ("compression", "retrieval"):
            raise StudyConfigError(f"unknown study {self.kind!r}; accepted: compression, retrieval")
        object.__setattr__(self, "methods", expand_methods(self.methods))
        if not self.methods:
            raise StudyConfigError("no methods given; name at least one")
        if not self.budgets:
            raise StudyConfigError("no budgets given; name at least one in (0, 1]")
        for budget in self.budgets:
            if isinstance(budget, bool) or not isinstance(budget, int | float):
                raise StudyConfigError(f"budget {budget!r} is not a number; accepted: (0, 1]")
            if not (math.isfinite(budget) and 0.0 < budget <= 1.0):
                raise StudyConfigError(
                    f"budget {budget} is outside (0, 1]; a budget is a fraction of the full "
                    "tables' memory"
                )
        object.__setattr__(self, "budgets", tuple(float(b) for b in dict.fromkeys(self.budgets)))
        if not self.seeds or any(seed < 0 for seed in self.seeds):
            raise StudyConfigError(f"seeds must be one or more ints >= 0, got {self.seeds}")
        object.__setattr__(self, "seeds", tuple(dict.fromkeys(self.seeds)))
        if self.dim < 4 or self.dim % 4:
            raise StudyConfigError(f"dim must be a multiple of 4, >= 4; got {self.dim}")
        if self.compress_min_rows is not None and self.compress_min_rows < 1:
            raise StudyConfigError(
                f"compress_min_rows must be >= 1 or None, got {self.compress_min_rows}"
            )
        if self.max_table_bytes < 1:
            raise StudyConfigError(f"max_table_bytes must be >= 1, got {self.max_table_bytes}")
        retriever = isinstance(self.model, TwoTowerConfig)
        if retriever != (self.kind == "retrieval"):
            accepted = "two_tower or mf" if self.kind == "retrieval" else ", ".join(CTR_MODELS)
            raise StudyConfigError(
                f"the {self.kind} study takes model {accepted}, got {self.model.name!r}"
            )

    @property
    def min_rows_to_compress(self) -> int:
        if self.compress_min_rows is not None:
            return self.compress_min_rows
        return COMPRESS_MIN_ROWS.get(self.dataset, DEFAULT_COMPRESS_MIN_ROWS)

    @property
    def name(self) -> str:
        """The results file's stem: compression_<dataset>_<model> or retrieval_<dataset>."""
        stem = (
            f"compression_{self.dataset}_{self.model.name}"
            if self.kind == "compression"
            else f"retrieval_{self.dataset}"
        )
        return f"{stem}_quick" if self.quick else stem

    def cells(self) -> list[Cell]:
        """Every cell: the full baseline once per seed at budget 1.0 (it cannot be compressed),
        then every other method at every budget, budget-major (so a partial grid has whole
        budgets)."""
        baseline = [Cell(BASELINE, 1.0, seed) for seed in self.seeds if BASELINE in self.methods]
        return baseline + [
            Cell(method, budget, seed)
            for budget in self.budgets
            for method in self.methods
            if method != BASELINE
            for seed in self.seeds
        ]

    def settings(self, data_info: dict) -> dict:
        """What every cell's result depends on besides its method, budget and seed, the
        prepared data set's row counts (`data_info`: its info.json) included: a resumed run
        must match it (kept in the results file)."""
        return {
            "kind": self.kind,
            "dataset": self.dataset,
            "data": {"rows": data_info.get("rows"), "splits": data_info.get("splits")},
            "model": dataclasses.asdict(self.model),
            "dim": self.dim,
            "compress_min_rows": self.min_rows_to_compress,
            "train": {
                key: value for key, value in dataclasses.asdict(self.train).items() if key != "seed"
            },
        }


def compression_study(
    dataset: str = "movielens-1m",
    model: str = "dcn",
    *,
    methods: tuple[str, ...] | None = None,
    budgets: tuple[float, ...] | None = None,
    seeds: tuple[int, ...] | None = None,
    quick: bool = False,
    **options: object,
) -> StudyConfig:
    """The CTR grid; `quick` is the reduced grid (budgets 1.0 and 0.1, one seed, 100k training
    rows, 50k evaluation rows); explicit methods/budgets/seeds/options win over both."""
    if model not in CTR_MODELS:
        raise StudyConfigError(
            f"unknown model {model!r} for the compression study; accepted: {', '.join(CTR_MODELS)}"
        )
    return _study(
        "compression",
        dataset,
        MODEL_CONFIGS[model](),
        methods or CTR_METHODS,
        budgets or (QUICK_BUDGETS if quick else BUDGETS),
        seeds or (QUICK_SEEDS if quick else SEEDS),
        quick,
        STUDY_TRAIN,
        options,
    )


def retrieval_study(
    dataset: str = "movielens-1m",
    *,
    methods: tuple[str, ...] | None = None,
    budgets: tuple[float, ...] | None = None,
    seeds: tuple[int, ...] | None = None,
    quick: bool = False,
    **options: object,
) -> StudyConfig:
    """The two-tower retrieval study: user and item id tables at budgets 0.25 and 0.1 (full at
    1.0 as the baseline), recall@20 and NDCG@20 on the test split; `quick`: budget 0.1 only,
    one seed, 100k training rows."""
    return _study(
        "retrieval",
        dataset,
        RETRIEVAL_MODEL,
        methods or RETRIEVAL_METHODS,
        budgets or (QUICK_RETRIEVAL_BUDGETS if quick else RETRIEVAL_BUDGETS),
        seeds or (QUICK_SEEDS if quick else SEEDS),
        quick,
        RETRIEVAL_TRAIN,
        options,
    )


def _study(
    kind: str,
    dataset: str,
    model: ModelConfig,
    methods: tuple[str, ...],
    budgets: tuple[float, ...],
    seeds: tuple[int, ...],
    quick: bool,
    train: TrainConfig,
    options: dict[str, object],
) -> StudyConfig:
    """A StudyConfig; `options` are StudyConfig fields, or TrainConfig fields (epochs,
    batch_size, train_rows, eval_rows) that change the trainer."""
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    study_fields = {f.name for f in dataclasses.fields(StudyConfig)}
    if quick:
        train = dataclasses.replace(train, train_rows=QUICK_TRAIN_ROWS, eval_rows=QUICK_EVAL_ROWS)
    train_options = {k: v for k, v in options.items() if k in train_fields and v is not None}
    study_options = {k: v for k, v in options.items() if k in study_fields and v is not None}
    unknown = sorted(set(options) - train_fields - study_fields)
    if unknown:
        raise StudyConfigError(f"unknown study option(s) {unknown}")
    try:
        train = dataclasses.replace(train, **train_options)
    except ModelConfigError as error:
        raise StudyConfigError(str(error)) from error
    return StudyConfig(
        kind=kind,
        dataset=dataset,
        model=model,
        methods=tuple(methods),
        budgets=tuple(budgets),
        seeds=tuple(seeds),
        train=train,
        quick=quick,
        **study_options,
    )
