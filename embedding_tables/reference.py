"""Plain-torch reference of every static method, written for clarity, not speed.

The fast path (transform -> fbgemm TBE -> combine) is tested against this: rows are computed id
by id by each method's own reference (`Method.reference_rows`: the pure-int hash specification
`hashing.bucket_int`, Python integer digits),
gathered by indexing, combined and pooled bag by bag, so autograd through it gives reference
gradients. `sparse_update` is the reference of the fused row-wise Adagrad / SGD step.
Only the layout (a TablePlan: physical tables and qr radices) is shared with the fast path.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from embedding_tables.combine import RowCombine
from embedding_tables.optimizer import SparseOptimizerConfig
from embedding_tables.planning import TablePlan
from embedding_tables.transforms import GraphHashMappingLike

if TYPE_CHECKING:
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


def reference_rows_of_id(
    plan: TablePlan, feature: str, value: int, mapping: GraphHashMappingLike | None = None
) -> list[tuple[str, int]]:
    """(physical table, row) of each lookup of one id, from the method's definition."""
    return plan.config.method.reference_rows(plan, feature, value, mapping)


def reference_embedding(
    plan: TablePlan,
    feature: str,
    value: int,
    weights: Mapping[str, torch.Tensor],
    mapping: GraphHashMappingLike | None = None,
) -> torch.Tensor:
    """The embedding of one id: its lookups' rows combined (concat / add / mult, or the plan's
    RowCombine on the one id)."""
    rows = [
        weights[table][row].float()
        for table, row in reference_rows_of_id(plan, feature, value, mapping)
    ]
    if isinstance(plan.combine, RowCombine):
        return plan.combine([row.unsqueeze(0) for row in rows])[0]
    if plan.combine in ("single", "concat"):
        return torch.cat(rows)
    result = rows[0]
    for more in rows[1:]:
        result = result + more if plan.combine == "add" else result * more
    return result


def _per_feature(features: KeyedJaggedTensor) -> dict[str, tuple[list[int], list[int], list]]:
    result = {}
    for key, jagged in features.to_dict().items():
        weights = jagged.weights_or_none()
        result[key] = (
            jagged.values().tolist(),
            jagged.lengths().tolist(),
            weights.tolist() if weights is not None else None,
        )
    return result


def reference_pooled(
    plans: Mapping[str, TablePlan],
    feature_to_table: Mapping[str, str],
    weights: Mapping[str, torch.Tensor],
    features: KeyedJaggedTensor,
    mappings: Mapping[str, GraphHashMappingLike] | None = None,
) -> dict[str, torch.Tensor]:
    """Pooled [B, output_dim] per feature: sum (or mean) of weight * embedding over each bag."""
    result = {}
    for feature, (values, lengths, sample_weights) in _per_feature(features).items():
        plan = plans[feature_to_table[feature]]
        mapping = (mappings or {}).get(plan.config.name)
        bags = []
        start = 0
        for length in lengths:
            width = _output_dim(plan, feature)
            bag = torch.zeros(width)
            for i in range(start, start + length):
                scale = 1.0 if sample_weights is None else sample_weights[i]
                bag = bag + scale * reference_embedding(plan, feature, values[i], weights, mapping)
            if plan.config.pooling == "mean" and length:
                bag = bag / length
            bags.append(bag)
            start += length
        result[feature] = torch.stack(bags) if bags else torch.zeros(0, _output_dim(plan, feature))
    return result


def reference_sequence(
    plans: Mapping[str, TablePlan],
    feature_to_table: Mapping[str, str],
    weights: Mapping[str, torch.Tensor],
    features: KeyedJaggedTensor,
    mappings: Mapping[str, GraphHashMappingLike] | None = None,
) -> dict[str, torch.Tensor]:
    """Unpooled [N_f, output_dim] per feature: one embedding per id, in KJT order."""
    result = {}
    for feature, (values, _, _) in _per_feature(features).items():
        plan = plans[feature_to_table[feature]]
        mapping = (mappings or {}).get(plan.config.name)
        rows = [reference_embedding(plan, feature, v, weights, mapping) for v in values]
        result[feature] = torch.stack(rows) if rows else torch.zeros(0, _output_dim(plan, feature))
    return result


def reference_touched_rows(
    plans: Mapping[str, TablePlan],
    feature_to_table: Mapping[str, str],
    features: KeyedJaggedTensor,
    mappings: Mapping[str, GraphHashMappingLike] | None = None,
) -> dict[str, set[int]]:
    """Physical rows each table reads for these features."""
    touched: dict[str, set[int]] = {}
    for feature, (values, _, _) in _per_feature(features).items():
        plan = plans[feature_to_table[feature]]
        mapping = (mappings or {}).get(plan.config.name)
        for value in values:
            for table, row in reference_rows_of_id(plan, feature, value, mapping):
                touched.setdefault(table, set()).add(row)
    return touched


def sparse_update(
    weight: torch.Tensor,
    momentum: torch.Tensor | None,
    grad: torch.Tensor,
    rows: set[int],
    optimizer: SparseOptimizerConfig,
) -> None:
    """One fused step on `rows` of `weight` (in place), given the batch's summed gradient."""
    for row in sorted(rows):
        g = grad[row].double()
        if optimizer.kind == "sgd":
            weight[row] = (weight[row].double() - optimizer.lr * g).to(weight.dtype)
            continue
        if momentum is None:
            raise ValueError("row-wise Adagrad needs the momentum (accumulator) tensor")
        momentum[row] = momentum[row] + (g * g).mean().to(momentum.dtype)
        step = optimizer.lr * g / (momentum[row].double().sqrt() + optimizer.eps)
        weight[row] = (weight[row].double() - step).to(weight.dtype)


def _output_dim(plan: TablePlan, feature: str) -> int:
    return plan.config.method.output_dim(plan.config, feature)
