"""How rows and row ids are stored as Redis hash fields and values.

Field: the row id (or, for a collisionless table, the raw id) as 8 bytes, int64 little-endian.
Value, for a row of `dim` values:

- `fp32`: dim float32, little-endian (4 * dim bytes), exact.
- `fp16`: dim float16, little-endian (2 * dim bytes); values beyond fp16's range are refused.
- `int8`: float32 scale, float32 bias, then dim uint8 codes q (8 + dim bytes); a value is
  `q * scale + bias`, with bias the row's minimum and scale its range / 255, so the error of every
  value is at most scale / 2 (plus float32 rounding): `quantised_error_bound` says it per row.
- `int4`: the same with 15 levels, two 4-bit codes per byte, value 2i in the low nibble of byte i
  and 2i + 1 in its high one (8 + ceil(dim / 2) bytes): a quarter of fp32's bytes at dim 16,
  for tables whose rows tolerate the coarser step.

Every function works on whole batches of rows with numpy: no per-value Python.
"""

from __future__ import annotations

import numpy as np

from serving.errors import EncodingError

ENCODINGS = ("fp32", "fp16", "int8", "int4")
ID_BYTES = 8
# Per-row quantised encodings: their levels above the row's minimum (codes 0..levels).
QUANTISED_LEVELS = {"int8": 255, "int4": 15}
QUANTISED_HEADER_BYTES = 8  # float32 scale, float32 bias
FP16_MAX = float(np.finfo(np.float16).max)
_ID_DTYPE = np.dtype("<i8")


def check_encoding(encoding: str) -> str:
    if encoding not in ENCODINGS:
        raise EncodingError(f"unknown row encoding {encoding!r}; accepted: {', '.join(ENCODINGS)}")
    return encoding


def row_bytes(encoding: str, dim: int) -> int:
    """Bytes of one encoded row of `dim` values."""
    check_encoding(encoding)
    if encoding == "fp32":
        return 4 * dim
    if encoding == "fp16":
        return 2 * dim
    if encoding == "int4":
        return QUANTISED_HEADER_BYTES + (dim + 1) // 2
    return QUANTISED_HEADER_BYTES + dim


def encode_ids(ids: np.ndarray) -> list[bytes]:
    """Each id as its 8-byte little-endian field."""
    packed = np.ascontiguousarray(ids, dtype=_ID_DTYPE).tobytes()
    return [packed[start : start + ID_BYTES] for start in range(0, len(packed), ID_BYTES)]


def decode_ids(fields: list[bytes]) -> np.ndarray:
    """The int64 ids of 8-byte fields (as HKEYS returns them)."""
    if any(len(field) != ID_BYTES for field in fields):
        raise EncodingError(f"a row field is not {ID_BYTES} bytes; is this an embtab row hash?")
    return np.frombuffer(b"".join(fields), dtype=_ID_DTYPE).astype(np.int64)


def encode_rows(rows: np.ndarray, encoding: str) -> np.ndarray:
    """[n, dim] float rows -> [n, row_bytes] uint8, one encoded row per line."""
    check_encoding(encoding)
    rows = np.asarray(rows, dtype=np.float32)
    if rows.ndim != 2:
        raise EncodingError(f"rows must be 2-D [n, dim], got shape {rows.shape}")
    if not np.isfinite(rows).all():
        raise EncodingError("rows hold NaN or inf; only finite values can be published")
    count = rows.shape[0]
    if encoding == "fp32":
        return rows.astype("<f4").view(np.uint8).reshape(count, -1)
    if encoding == "fp16":
        if rows.size and float(np.abs(rows).max()) > FP16_MAX:
            raise EncodingError(
                f"a row value exceeds fp16's range (|x| <= {FP16_MAX:g}); use fp32 or int8"
            )
        return rows.astype("<f2").view(np.uint8).reshape(count, -1)
    levels = QUANTISED_LEVELS[encoding]
    low = rows.min(axis=1, keepdims=True) if rows.size else np.zeros((count, 1), np.float32)
    high = rows.max(axis=1, keepdims=True) if rows.size else np.zeros((count, 1), np.float32)
    scale = (high - low) / levels
    safe_scale = np.where(scale > 0, scale, 1.0)
    codes = np.clip(np.rint((rows - low) / safe_scale), 0, levels).astype(np.uint8)
    if encoding == "int4":
        codes = _pack_nibbles(codes)
    header = np.concatenate([scale, low], axis=1).astype("<f4").view(np.uint8)
    return np.concatenate([header, codes], axis=1)


def decode_rows(encoded: np.ndarray, encoding: str, dim: int) -> np.ndarray:
    """[n, row_bytes] uint8 -> [n, dim] float32."""
    check_encoding(encoding)
    expected = row_bytes(encoding, dim)
    if encoded.ndim != 2 or encoded.shape[1] != expected:
        raise EncodingError(
            f"encoded {encoding} rows of dim {dim} must be [n, {expected}] bytes, "
            f"got shape {encoded.shape}"
        )
    encoded = np.ascontiguousarray(encoded)
    if encoding == "fp32":
        return encoded.view("<f4").astype(np.float32)
    if encoding == "fp16":
        return encoded.view("<f2").astype(np.float32)
    header = np.ascontiguousarray(encoded[:, :QUANTISED_HEADER_BYTES]).view("<f4")
    codes = encoded[:, QUANTISED_HEADER_BYTES:]
    if encoding == "int4":
        codes = _unpack_nibbles(codes, dim)
    return codes.astype(np.float32) * header[:, :1] + header[:, 1:2]


def decode_values(
    values: list[bytes | None], encoding: str, dim: int
) -> tuple[np.ndarray, np.ndarray]:
    """HMGET's answer -> ([n, dim] float32 rows, [n] bool found); absent rows are zeros."""
    found = np.fromiter((value is not None for value in values), dtype=bool, count=len(values))
    rows = np.zeros((len(values), dim), dtype=np.float32)
    if found.any():
        width = row_bytes(encoding, dim)
        present = [value for value in values if value is not None]
        if any(len(value) != width for value in present):
            raise EncodingError(
                f"a stored row is not {width} bytes ({encoding}, dim {dim}); the manifest and "
                "the rows disagree"
            )
        packed = np.frombuffer(b"".join(present), dtype=np.uint8).reshape(len(present), width)
        rows[found] = decode_rows(packed, encoding, dim)
    return rows, found


def quantised_error_bound(rows: np.ndarray, encoding: str) -> np.ndarray:
    """Per row, the largest error a quantised encoding (int8, int4) may make: half a step, plus
    float32 rounding."""
    if encoding not in QUANTISED_LEVELS:
        raise EncodingError(
            f"{encoding!r} is not a quantised encoding; accepted: {', '.join(QUANTISED_LEVELS)}"
        )
    rows = np.asarray(rows, dtype=np.float32)
    if rows.size == 0:
        return np.zeros(rows.shape[0], dtype=np.float32)
    step = (rows.max(axis=1) - rows.min(axis=1)) / QUANTISED_LEVELS[encoding]
    magnitude = np.abs(rows).max(axis=1)
    return step / 2 + 4 * np.finfo(np.float32).eps * (magnitude + 1)


def _pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """[n, dim] codes 0..15 -> [n, ceil(dim / 2)] bytes, code 2i low and 2i + 1 high."""
    if codes.shape[1] % 2:
        codes = np.concatenate([codes, np.zeros((codes.shape[0], 1), np.uint8)], axis=1)
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def _unpack_nibbles(packed: np.ndarray, dim: int) -> np.ndarray:
    codes = np.empty((packed.shape[0], 2 * packed.shape[1]), dtype=np.uint8)
    codes[:, 0::2] = packed & 0x0F
    codes[:, 1::2] = packed >> 4
    return codes[:, :dim]
