"""`ttrec`: the tensor-train embedding table of TT-Rec (Yin et al., MLSys 2021).

The table is a tensor train of K cores. An id's mixed-radix digits (i_1, ..., i_K) in radices
(n_1, ..., n_K), prod n_k >= num_embeddings (qr's digits, digit 1 the least significant), pick
slice i_k of each core G_k, an r_{k-1} x d_k x r_k tensor (r_0 = r_K = 1, the others `rank`,
dim = prod d_k); the id's row is the contraction G_1[i_1] G_2[i_2] ... G_K[i_K], flattened to
its d_1 x ... x d_K entries (d_1 the most significant).

Core k is one physical table of n_k rows, each a flattened slice, so lookup k is a plain gather
of row i_k (qr's `arith` slot rule: the batched transform and the kernels compute it), and the
contraction is the plan's `TTContraction`, a RowCombine: taken per id before pooling, in torch
ops, so autograd gives the cores' gradients.

Initialisation follows the paper's proposal to draw the cores from a sampled Gaussian (its
abstract and initialisation section), with the product's scale kept out of the cores: every core
entry is drawn from N(0, 1) and the contraction multiplies the product by a fixed c so that it
has the variance of a plain table's init. An entry of the product sums prod(r_1 .. r_{K-1}) =
rank^(K-1) products of K independent unit entries, so its variance is c^2 rank^(K-1); the plain
table's is that of uniform ±sqrt(1/num_embeddings), 1 / (3 num_embeddings); hence
c = (1 / (3 num_embeddings rank^(K-1)))^(1/2).

Why not cores of std c^(1/K) (the same product, c = 1): the sparse optimizers step each entry
by about their learning rate whatever the gradient's scale (row-wise Adagrad normalises it), so
the step relative to an entry is lr / std. With the scale in the cores, std shrinks with the rank
(0.055 at rank 56 for 3706 ids), the study's lr 0.2 moved each entry by several times its size,
and the product, K such factors summed over rank^(K-1) terms, by more the higher the rank: one
step changed the rows by 6x their norm at rank 4 and 60x at rank 56, and training at rank 56
diverged. With unit cores the relative step is lr at every rank (the rows change by 0.4x to
0.9x their norm), which is a per-core learning-rate scale of c^(1/K) expressed in the
parameterisation.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from embedding_tables.combine import RowCombine
from embedding_tables.errors import BudgetError, ConfigError
from embedding_tables.methods.base import check_choice
from embedding_tables.methods.full import OUT_OF_RANGE
from embedding_tables.methods.qr import DigitLookups, balanced_radices
from embedding_tables.methods.registry import register
from embedding_tables.methods.robe import array_elements
from embedding_tables.planning import (
    TBE_DIM_MULTIPLE,
    TablePlan,
    physical_table,
    smallest_budget,
)

if TYPE_CHECKING:
    from embedding_tables.config import TableConfig

# Ranks an error message lists at most.
LISTED_RANKS = 32


@register
@dataclass(frozen=True)
class TTRec(DigitLookups):
    """`rank`: the TT rank r of the inner bonds (>= 1); `num_cores`: K (>= 2); `dim_factors`:
    d_1 .. d_K, whose product is dim (None: the factorisation of dim with the fewest
    parameters whose core rows fit the table-batched kernels); `out_of_range`: as for `full`.
    With a budget, the cores at `rank` must fit it (`at_budget` picks the largest rank that
    does)."""

    name = "ttrec"
    indexes_by_id = True

    rank: int = 8
    num_cores: int = 3
    dim_factors: tuple[int, ...] | None = None
    out_of_range: str = "error"

    def __post_init__(self) -> None:
        check_choice(self.name, "out_of_range", self.out_of_range, OUT_OF_RANGE)
        if not _positive_int(self.rank):
            raise ConfigError(f"method 'ttrec': rank must be an int >= 1, got {self.rank!r}")
        if not _positive_int(self.num_cores) or self.num_cores < 2:
            raise ConfigError(
                f"method 'ttrec': num_cores must be an int >= 2, got {self.num_cores!r}"
            )
        if self.dim_factors is not None:
            factors = tuple(self.dim_factors)
            if len(factors) != self.num_cores or not all(map(_positive_int, factors)):
                raise ConfigError(
                    f"method 'ttrec': dim_factors must be {self.num_cores} ints >= 1 (one per "
                    f"core, num_cores={self.num_cores}), got {self.dim_factors!r}"
                )
            object.__setattr__(self, "dim_factors", factors)

    def check_table(self, config: TableConfig) -> None:
        """The factors multiply to dim, every core row is a multiple of 4 wide, and the rank
        is at most what the factors and radices allow."""
        factors = self.factors(config)
        radices = self.radices(config)
        most = max_rank(radices, factors)
        if self.rank > most:
            raise ConfigError(
                f"table {config.name!r}: ttrec rank {self.rank} exceeds the largest useful rank "
                f"{most} of radices {radices} and dim_factors {factors} (a bond's rank is at "
                f"most the smaller side's n_k x d_k product); accepted ranks: 1 to {most}"
            )

    def radices(self, config: TableConfig) -> tuple[int, ...]:
        """Rows of each core (digit 0 first): the balanced, smallest cover of the ids."""
        return balanced_radices(config.num_embeddings, self.num_cores)

    def ranks(self) -> tuple[int, ...]:
        """r_0 .. r_K: 1 at both ends, `rank` between."""
        return bond_ranks(self.rank, self.num_cores)

    def factors(self, config: TableConfig) -> tuple[int, ...]:
        """d_1 .. d_K: the given dim_factors, checked, or the cheapest fitting factorisation."""
        if self.dim_factors is not None:
            if math.prod(self.dim_factors) != config.dim:
                raise ConfigError(
                    f"table {config.name!r}: ttrec dim_factors {self.dim_factors} multiply to "
                    f"{math.prod(self.dim_factors)}, not dim {config.dim}; accepted: "
                    f"{self.num_cores} ints >= 1 whose product is {config.dim}"
                )
            if not fits_kernels(self.dim_factors, self.ranks()):
                accepted = [
                    r
                    for r in range(1, max_rank(self.radices(config), self.dim_factors) + 1)
                    if fits_kernels(self.dim_factors, bond_ranks(r, self.num_cores))
                ]
                raise ConfigError(
                    f"table {config.name!r}: ttrec rank {self.rank} with dim_factors "
                    f"{self.dim_factors} gives core rows "
                    f"{core_widths(self.dim_factors, self.ranks())} wide; the table-batched "
                    f"kernels need multiples of {TBE_DIM_MULTIPLE}; "
                    f"accepted ranks with these factors: {_listed(accepted)}"
                )
            return self.dim_factors
        radices = self.radices(config)
        fitting = [
            factors
            for factors in factorisations(config.dim, self.num_cores)
            if fits_kernels(factors, self.ranks())
        ]
        if not fitting:
            every = list(factorisations(config.dim, self.num_cores))
            accepted = [
                r
                for r in range(1, max(max_rank(radices, f) for f in every) + 1)
                if any(fits_kernels(f, bond_ranks(r, self.num_cores)) for f in every)
            ]
            raise ConfigError(
                f"table {config.name!r}: no factorisation of dim {config.dim} into "
                f"{self.num_cores} factors gives core rows (r_(k-1) x d_k x r_k) of multiples "
                f"of {TBE_DIM_MULTIPLE} at rank {self.rank}; accepted ranks: {_listed(accepted)}"
            )
        return min(fitting, key=lambda factors: core_parameters(radices, factors, self.ranks()))

    def init_std(self, config: TableConfig) -> float:
        """sigma of the sampled Gaussian init of the cores' entries: 1 (module docstring)."""
        return 1.0

    def output_scale(self, config: TableConfig) -> float:
        """The contraction's fixed factor c: the product's variance is the plain table's,
        c^2 rank^(K-1) = 1 / (3 num_embeddings) with unit cores (module docstring)."""
        return math.sqrt(1.0 / (3.0 * config.num_embeddings * self.rank ** (self.num_cores - 1)))

    def plan(self, config: TableConfig, mapping_rows: int | None) -> TablePlan:
        radices, factors, ranks = self.radices(config), self.factors(config), self.ranks()
        widths = core_widths(factors, ranks)
        needed = sum(n * w for n, w in zip(radices, widths, strict=True))
        if config.budget is not None and needed > array_elements(config):
            raise BudgetError(
                f"table {config.name!r}: ttrec cores at rank {self.rank} (radices {radices}, "
                f"dim_factors {factors}) hold {needed} parameters, but budget {config.budget!r} "
                f"allows {array_elements(config)}; lower the rank, or give a budget of "
                f"{smallest_budget(-(-needed // config.dim), config.num_embeddings)} or more"
            )
        std = self.init_std(config)
        physical = tuple(
            physical_table(config, name, rows, width, init_std=std)
            for name, rows, width in zip(self.core_names(config), radices, widths, strict=True)
        )
        return TablePlan(
            config, physical, TTContraction(factors, ranks, self.output_scale(config)), radices
        )

    def core_names(self, config: TableConfig) -> tuple[str, ...]:
        """Physical names of the cores, digit 0 first: `t.c0` ... `t.c{K-1}`."""
        return tuple(f"{config.name}.c{k}" for k in range(self.num_cores))

    def at_budget(self, config: TableConfig) -> tuple[TableConfig, dict[str, Any]]:
        """The largest rank whose cores fit the budget and the kernels (the config's own rank
        with no budget)."""
        if config.budget is None:
            return config, self._decisions(self.plan(config, None))
        radices, allowed = self.radices(config), array_elements(config)
        candidates = (
            [self.dim_factors]
            if self.dim_factors is not None
            else list(factorisations(config.dim, self.num_cores))
        )
        highest = max(max_rank(radices, factors) for factors in candidates)

        def cheapest(rank: int) -> int:
            ranks = bond_ranks(rank, self.num_cores)
            return min(core_parameters(radices, factors, ranks) for factors in candidates)

        best: TableConfig | None = None
        rank = 1
        while rank <= highest and cheapest(rank) <= allowed:
            try:
                candidate = dataclasses.replace(config, method=dataclasses.replace(self, rank=rank))
                candidate.method.plan(candidate, None)
            except ConfigError:  # a rank the kernels or the radices refuse: try the next
                pass
            else:
                best = candidate
            rank += 1
        if best is None:
            # The cheapest cores the kernels take: rank 4 fits any factors, a lower one some.
            needed = min(
                core_parameters(radices, factors, bond_ranks(rank, self.num_cores))
                for rank in range(1, TBE_DIM_MULTIPLE + 1)
                for factors in candidates
                if fits_kernels(factors, bond_ranks(rank, self.num_cores))
            )
            raise BudgetError(
                f"table {config.name!r}: no ttrec rank fits budget {config.budget!r} "
                f"({allowed} parameters) with {self.num_cores} cores (radices {radices}); the "
                f"cheapest cores the kernels take hold {needed} parameters: a budget of "
                f"{smallest_budget(-(-needed // config.dim), config.num_embeddings)} or more"
            )
        return best, self._decisions(best.method.plan(best, None))

    def _decisions(self, plan: TablePlan) -> dict[str, Any]:
        contraction = plan.combine
        assert isinstance(contraction, TTContraction)
        return {
            "rank": contraction.ranks[1],
            "dim_factors": contraction.dim_factors,
            "radices": plan.radices,
        }


@dataclass(frozen=True)
class TTContraction(RowCombine):
    """The tensor-train contraction of one id's core slices: lookup k's row is core k's slice,
    r_{k-1} x d_k x r_k, flattened; the result is the d_1 x ... x d_K product, flattened."""

    dim_factors: tuple[int, ...]
    ranks: tuple[int, ...]
    scale: float = 1.0

    @property
    def output_dim(self) -> int:  # type: ignore[override]
        return math.prod(self.dim_factors)

    def __call__(self, rows: Sequence[torch.Tensor]) -> torch.Tensor:
        count = rows[0].shape[0]
        product = rows[0]
        width = self.dim_factors[0]
        for k in range(1, len(self.dim_factors)):
            left = product.reshape(count, width, self.ranks[k])
            core = rows[k].reshape(count, self.ranks[k], self.dim_factors[k] * self.ranks[k + 1])
            product = torch.bmm(left, core)
            width *= self.dim_factors[k]
        return product.reshape(count, width) * self.scale


def bond_ranks(rank: int, cores: int) -> tuple[int, ...]:
    """r_0 .. r_K of a train of `cores` cores with inner rank `rank`."""
    return (1, *(rank,) * (cores - 1), 1)


def core_widths(factors: Sequence[int], ranks: Sequence[int]) -> tuple[int, ...]:
    """Row width of each core: r_{k-1} x d_k x r_k."""
    return tuple(ranks[k] * d * ranks[k + 1] for k, d in enumerate(factors))


def core_parameters(radices: Sequence[int], factors: Sequence[int], ranks: Sequence[int]) -> int:
    """Parameters of all cores: sum of n_k x r_{k-1} x d_k x r_k."""
    return sum(n * w for n, w in zip(radices, core_widths(factors, ranks), strict=True))


def fits_kernels(factors: Sequence[int], ranks: Sequence[int]) -> bool:
    """Whether every core row is a multiple of 4 wide (what the table-batched kernels take)."""
    return all(width % TBE_DIM_MULTIPLE == 0 for width in core_widths(factors, ranks))


def max_rank(radices: Sequence[int], factors: Sequence[int]) -> int:
    """The largest useful uniform rank: bond k's rank is at most the rank of the table's
    unfolding there, min(prod_{i<=k} n_i d_i, prod_{i>k} n_i d_i)."""
    sides = [n * d for n, d in zip(radices, factors, strict=True)]
    return min(min(math.prod(sides[:k]), math.prod(sides[k:])) for k in range(1, len(sides)))


def factorisations(dim: int, parts: int) -> Iterator[tuple[int, ...]]:
    """Every ordered way of writing dim as a product of `parts` ints >= 1."""
    if parts == 1:
        yield (dim,)
        return
    for first in range(1, dim + 1):
        if dim % first == 0:
            for rest in factorisations(dim // first, parts - 1):
                yield (first, *rest)


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _listed(ranks: list[int]) -> str:
    if not ranks:
        return "none"
    shown = ", ".join(map(str, ranks[:LISTED_RANKS]))
    return shown + (f", ... up to {ranks[-1]}" if len(ranks) > LISTED_RANKS else "")
