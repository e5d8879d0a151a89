"""The combine step: an id's lookups -> its embedding, and pooling of combines that precede it.

A plan's combine is a name (`single`, `concat`, `add`, `mult`) or a method's own `RowCombine`
(ttrec's tensor-train contraction). `single`, `concat` and `add` commute with pooling, so each
lookup is pooled on its own and the pooled rows combined (`pools_per_lookup`); `mult` and a
`RowCombine` do not: their lookups are read unpooled, combined per id, then pooled.

qr `mult` cannot be pooled table by table (sum of products is not the product of sums), so its
partitions' rows are looked up unpooled and `mult_pool` forms, per feature, the elementwise
product of the partitions' rows and pools it. It is one autograd Function over the whole
unpooled lookup output: the backward writes each partition's gradient (product rule) straight
into the gradient of that output, which the fused-optimizer lookup consumes, instead of
materialising a gradient per slot and concatenating them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

# The named combines that commute with pooling.
POOLED_COMBINES = ("single", "concat", "add")


class RowCombine:
    """A method's own combine of one id's lookups into its row, which does not commute with
    pooling: the collection reads its lookups unpooled, calls it, then pools. A subclass is a
    frozen dataclass (plans compare and hash it) with `output_dim`, the row's width."""

    output_dim: int

    def __call__(self, rows: Sequence[torch.Tensor]) -> torch.Tensor:
        """`rows[j]`: [N, width of lookup j] for N ids -> [N, output_dim]."""
        raise NotImplementedError


Combine = str | RowCombine


def pools_per_lookup(combine: Combine) -> bool:
    """Whether each lookup may be pooled on its own before combining (not `mult`, not a
    RowCombine: those are combined per id before pooling)."""
    return isinstance(combine, str) and combine in POOLED_COMBINES


def combine_rows(combine: Combine, rows: Sequence[torch.Tensor]) -> torch.Tensor:
    """One id's lookups -> its row: the single row, concatenated, summed, multiplied, or the
    method's RowCombine."""
    if isinstance(combine, RowCombine):
        return combine(rows)
    if combine == "single":
        return rows[0]
    if combine == "concat":
        return torch.cat(list(rows), dim=1)
    result = rows[0]
    for more in rows[1:]:
        result = result + more if combine == "add" else result * more
    return result


@dataclass(frozen=True)
class UnpooledFeature:
    """One feature combined before pooling (qr mult, a RowCombine) inside an unpooled lookup
    output [N_max, columns].

    `columns`: (start, end) of each partition's rows; the feature's ids are the first `count`
    rows. `lengths`: [B] bag lengths. `weights`: per-id pooling weights or None.
    """

    columns: tuple[tuple[int, int], ...]
    count: int
    lengths: torch.Tensor
    weights: torch.Tensor | None

    def bag_length(self) -> int | None:
        """The common bag length when every bag has it (pooling is then a reshape), else None."""
        batch = self.lengths.numel()
        if batch == 0 or self.count == 0 or self.count % batch:
            return None
        length = self.count // batch
        return length if bool((self.lengths == length).all()) else None


def _parts(rows: torch.Tensor, feature: UnpooledFeature) -> list[torch.Tensor]:
    return [rows[: feature.count, start:end] for start, end in feature.columns]


def _pool(values: torch.Tensor, feature: UnpooledFeature, length: int | None) -> torch.Tensor:
    if length is not None:
        return values.reshape(feature.lengths.numel(), length, -1).sum(dim=1)
    if feature.lengths.numel() == 0:  # an empty batch: segment_reduce refuses empty lengths
        return values.new_zeros((0, values.shape[1]))
    return torch.segment_reduce(values, "sum", lengths=feature.lengths)


def _spread(pooled_grad: torch.Tensor, feature: UnpooledFeature) -> torch.Tensor:
    """d(pooled)/d(row) * upstream: each bag's gradient copied to its ids (times weights)."""
    bags = torch.repeat_interleave(
        torch.arange(feature.lengths.numel(), device=pooled_grad.device),
        feature.lengths,
        output_size=feature.count,
    )
    spread = pooled_grad.index_select(0, bags)
    if feature.weights is not None:
        spread.mul_(feature.weights.unsqueeze(1))
    return spread


class _MultPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows: torch.Tensor, features: Sequence[UnpooledFeature]):  # type: ignore[override]
        ctx.features = features
        ctx.save_for_backward(rows)
        pooled = []
        for feature in features:
            parts = _parts(rows, feature)
            product = parts[0] * parts[1]
            for part in parts[2:]:
                product.mul_(part)
            if feature.weights is not None:
                product.mul_(feature.weights.unsqueeze(1))
            pooled.append(_pool(product, feature, feature.bag_length()))
        return tuple(pooled)

    @staticmethod
    def backward(ctx, *pooled_grads: torch.Tensor | None):  # type: ignore[override]
        (rows,) = ctx.saved_tensors
        features: Sequence[UnpooledFeature] = ctx.features
        covered = sum(f.count * sum(end - start for start, end in f.columns) for f in features)
        complete = covered == rows.numel() and all(g is not None for g in pooled_grads)
        grad_rows = torch.empty_like(rows) if complete else torch.zeros_like(rows)
        for feature, pooled_grad in zip(features, pooled_grads, strict=True):
            if pooled_grad is None:
                continue
            parts = _parts(rows, feature)
            targets = _parts(grad_rows, feature)
            length = feature.bag_length()
            if length is not None and feature.weights is None:
                # Broadcast the bag's gradient over its ids instead of copying it out.
                batch, dim = pooled_grad.shape
                upstream = pooled_grad.reshape(batch, 1, dim)
                shape = (batch, length, dim)
            else:
                upstream = _spread(pooled_grad, feature)
                shape = tuple(upstream.shape)
            for j, target in enumerate(targets):
                others = [part for i, part in enumerate(parts) if i != j]
                product = others[0] if len(others) == 1 else combine_rows("mult", others)
                torch.mul(product.reshape(shape), upstream, out=target.view(shape))
        return grad_rows, None


def mult_pool(rows: torch.Tensor, features: Sequence[UnpooledFeature]) -> list[torch.Tensor]:
    """Per feature, [B, dim]: sum over each bag of weight * (product of its partitions' rows)."""
    return list(_MultPool.apply(rows, features))


def pool_rows(
    rows: torch.Tensor, lengths: torch.Tensor, weights: torch.Tensor | None
) -> torch.Tensor:
    """[B, width]: sum over each bag of weight * row, for rows already combined (a
    RowCombine's), in torch ops (autograd gives the rows' gradients)."""
    feature = UnpooledFeature((), rows.shape[0], lengths, weights)
    if weights is not None:
        rows = rows * weights.unsqueeze(1)
    return _pool(rows, feature, feature.bag_length())
