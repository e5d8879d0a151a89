"""KJTs checked once where they enter: `check_kjt` validates the layout, `CheckedKJT` marks it.

A forward cannot trust a KeyedJaggedTensor's lengths (negative, or not adding up to the ids)
without reading them back from the device; doing that in every forward costs a device-to-host
sync. Batches are instead checked where they are built (`models.batches.batch_from_columns`,
which the trainers and the scorer's request path use): `check_kjt` reads the lengths once,
caches the per-key id counts in the KJT, and returns a `CheckedKJT`, whose forward in
`EmbeddingCollection` skips the layout checks (it still matches the keys to its features, a
comparison of names). Any other KJT is checked in the forward as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embedding_tables.errors import FeatureError, IdError, OffsetsError

ID_DTYPES = (torch.int64, torch.int32)


class CheckedKJT(KeyedJaggedTensor):
    """A KeyedJaggedTensor whose layout `check_kjt` validated: integer ids, one length >= 0
    per key and sample, lengths adding up to the ids, at most one weight per id, and its
    per-key id counts cached. Moving it (`to`) keeps the mark: the layout does not change."""

    def to(self, *args: Any, **kwargs: Any) -> CheckedKJT:
        return _mark(super().to(*args, **kwargs), self.length_per_key())


def check_layout(
    keys: Sequence[str],
    stride: int,
    values: torch.Tensor,
    lengths: torch.Tensor,
    weights: torch.Tensor | None,
) -> list[int]:
    """The ids per key, after checking that the lengths (one per key and sample) and the
    weights (one per id, or none) describe exactly the ids; OffsetsError / IdError otherwise
    (torch would fail later with a bare RuntimeError). Reads the lengths back once."""
    named = ", ".join(map(repr, keys))
    if values.dtype not in ID_DTYPES:
        raise IdError(
            f"features {named}: ids must be integers (int64 or int32), got dtype {values.dtype}"
        )
    if lengths.numel() != len(keys) * stride:
        raise OffsetsError(
            f"features {named}: {lengths.numel()} lengths for {len(keys)} features x batch "
            f"{stride}; one length per feature and sample is accepted"
        )
    if weights is not None and weights.numel() != values.numel():
        raise OffsetsError(
            f"features {named}: {weights.numel()} weights for {values.numel()} ids; one weight "
            "per id (or none) is accepted"
        )
    per_key = lengths.view(len(keys), stride).sum(dim=1)
    smallest = lengths.min() if lengths.numel() else lengths.new_zeros(())
    counts = torch.cat([smallest.view(1), per_key]).tolist()  # one device-to-host copy
    if counts[0] < 0:
        raise OffsetsError(f"features {named}: lengths must be >= 0, got {counts[0]}")
    total = sum(counts[1:])
    if total != values.numel():
        raise OffsetsError(
            f"features {named}: the lengths add up to {total} ids but there are {values.numel()}"
        )
    return counts[1:]


def check_kjt(features: KeyedJaggedTensor) -> CheckedKJT:
    """`features` checked (see `check_layout`) and marked as such; the same tensors."""
    if isinstance(features, CheckedKJT):
        return features
    if features.variable_stride_per_key():
        raise FeatureError("KeyedJaggedTensor with a batch size per feature is not supported")
    keys = features.keys()
    counts = check_layout(
        keys, features.stride(), features.values(), features.lengths(), features.weights_or_none()
    )
    return _mark(features, counts)


def _mark(features: KeyedJaggedTensor, counts: list[int]) -> CheckedKJT:
    return CheckedKJT(
        keys=features.keys(),
        values=features.values(),
        weights=features.weights_or_none(),
        lengths=features.lengths(),
        stride=features.stride(),
        length_per_key=list(counts),
    )
