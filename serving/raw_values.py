"""Raw feature values in a scoring request -> the model's input, through the version's artifact.

A request names features by the spec's names and sends values as they appear in the source
files: string or integer ids (a list of them for a bag or a sequence, oldest first) and numbers
for dense features. Each goes through the same `Preprocessor.encode` the trainer's data went
through, so an id is looked up in the same vocabulary (an unseen one gets the
out-of-vocabulary id, or no row at all for a vocabulary without one) and hashed with the same
seed. An integer sent for a feature whose raw ids are strings is taken as an already prepared
id: the fast path embtab's own tools use.

The result is a request of prepared ids that `serving.request.request_columns` checks as
before, plus which user and items have no id (an empty bag in the model's input).
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pyarrow as pa

from feature_store.artifact import Preprocessor
from feature_store.spec import FeatureDef
from serving.request import RequestShapeError, RequestValues


class RawValueEncoder:
    """Encodes requests for one model version; counts ids its vocabularies do not hold."""

    def __init__(
        self,
        preprocessing: Preprocessor,
        user_column: str,
        item_column: str,
        unknown: Counter[str],
    ) -> None:
        self.preprocessing = preprocessing
        self.user_column = user_column
        self.item_column = item_column
        self.features = {feature.name: feature for feature in preprocessing.spec.features}
        self.unknown = unknown

    def encode(self, request: RequestValues) -> RequestValues:
        """The request in prepared ids, with which user and items have no id; values are
        encoded a feature at a time, over all the candidates that give it."""
        user, user_known = self._id(self.user_column, request.user_id, "user_id")
        item_ids, item_known = self._ids(
            self.item_column, request.item_ids, lambda index: f"candidates[{index}].item_id"
        )
        context = {
            name: self._values(name, [value], lambda _, name=name: f"context.{name}")[0]
            for name, value in request.context.items()
        }
        features = {}
        for name, (positions, values) in request.features.items():

            def where(index: int, name: str = name, positions: list[int] = positions) -> str:
                return f"candidates[{positions[index]}].features.{name}"

            features[name] = (positions, self._values(name, values, where))
        return dataclasses.replace(
            request,
            user_id=user,
            item_ids=item_ids.tolist(),
            context=context,
            features=features,
            user_known=user_known,
            item_known=item_known,
            raw_user_id=self._raw_ids(self.user_column, [request.user_id])[0],
            raw_item_ids=self._raw_ids(self.item_column, request.item_ids),
        )

    def _raw_ids(self, name: str, values: list) -> list:
        """The raw ids of the user or the candidates, which the online store is keyed by: as
        sent, but a prepared id (an int sent for string ids) becomes its vocabulary value (None
        for the OOV id). Hashed string ids cannot be inverted: those stay as sent."""
        feature = self.features.get(name)
        if feature is None or feature.type != "string" or feature.ids != "vocabulary":
            return list(values)
        prepared = [index for index, value in enumerate(values) if type(value) is int]
        if not prepared:
            return list(values)
        raw = [None if type(value) is int and value < 0 else value for value in values]
        prepared = [index for index in prepared if raw[index] is not None]
        decoded = self.preprocessing.decode(name, pa.array([values[i] for i in prepared]))
        for index, value in zip(prepared, decoded.to_pylist(), strict=True):
            raw[index] = value
        return raw

    def _id(self, name: str, value: object, where: str) -> tuple[int, bool]:
        ids, known = self._ids(name, [value], lambda _: where)
        return int(ids[0]), bool(known[0])

    def _ids(self, name: str, values: list, where) -> tuple[np.ndarray, np.ndarray]:
        """One id per value of a user or item id column (0 and unknown where none maps)."""
        feature = self.features.get(name)
        if feature is None or feature.kind != "categorical":
            return np.asarray(values, dtype=np.int64), np.ones(len(values), dtype=bool)
        encoded = self._values(name, values, where)
        ids = np.array([v[0] if isinstance(v, list) and v else v for v in encoded], dtype=object)
        known = np.array([not (isinstance(v, list) and not v) for v in encoded], dtype=bool)
        ids[~known] = 0
        return ids.astype(np.int64), known

    def _values(self, name: str, values: list, where) -> list:
        """Each value of one feature as the model takes it (int, list of ints or a float)."""
        feature = self.features.get(name)
        if feature is None:
            return values
        if feature.kind in ("dense", "count"):
            return self._numbers(feature, values, where)
        source = self.features[feature.of] if feature.kind == "sequence" else feature
        if source.type == "string" and all(type(value) is int for value in values):
            return values  # prepared ids, as embtab's own tools send them: nothing to encode
        scalar = feature.kind == "categorical"
        flat: list[object] = []
        lengths: list[int] = []
        for index, value in enumerate(values):
            row = value if isinstance(value, list) else [value]
            if scalar and isinstance(value, list) and len(value) != 1:
                return values  # request_columns reports a bag given to a one-id feature
            for item in row:
                _check_id_type(source, item, where(index))
            flat.extend(row)
            lengths.append(len(row))
        prepared = np.array([isinstance(v, int) and source.type == "string" for v in flat], bool)
        out = np.zeros(len(flat), dtype=np.int64)
        keep = np.ones(len(flat), dtype=bool)
        raw_positions = np.flatnonzero(~prepared)
        if len(raw_positions):
            raw = pa.array(
                [flat[i] for i in raw_positions],
                pa.string() if source.type == "string" else pa.int64(),
            )
            ids, present, unseen = self.preprocessing.encode_ids_counted(source, raw)
            out[raw_positions] = ids
            keep[raw_positions] = present
            if unseen:
                self.unknown[name] += unseen
        out[prepared] = [flat[i] for i in np.flatnonzero(prepared)]
        limit = self.preprocessing.max_lengths.get(name, 1)
        results: list = []
        start = 0
        for index, length in enumerate(lengths):
            row_ids = out[start : start + length][keep[start : start + length]].tolist()
            start += length
            if feature.kind == "multi_valued":
                row_ids = row_ids[:limit]  # bags keep their first values, as when prepared
            is_list = isinstance(values[index], list) or not scalar or len(row_ids) != 1
            results.append(row_ids if is_list else row_ids[0])
        return results

    def _numbers(self, feature: FeatureDef, values: list, where) -> list:
        for index, value in enumerate(values):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise RequestShapeError(
                    where(index), f"feature {feature.name!r} takes a number, got {value!r}"
                )
        transformed = self.preprocessing.dense_values(feature, pa.array(values, pa.float64()))
        return [float(number) for number in transformed]


def _check_id_type(feature: FeatureDef, value: object, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise RequestShapeError(where, f"feature {feature.name!r} takes ids, got {value!r}")
    if feature.type == "int" and isinstance(value, str):
        raise RequestShapeError(
            where, f"feature {feature.name!r} takes integer ids, got the string {value!r}"
        )
