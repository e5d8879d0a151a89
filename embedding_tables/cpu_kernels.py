"""embtab's CPU kernels (cpu_kernels.c): fused index transforms and a fused pooled forward.

The C source ships with the package; on first use it is compiled with the system C compiler
(`cc`, or $CC) into ~/.cache/embtab/kernels/ (or $XDG_CACHE_HOME/embtab/kernels/), keyed by a
hash of the source, the flags, the compiler and the CPU, and loaded with ctypes. Without a
compiler `library()` is None after one warning (and with EMBTAB_CPU_KERNELS=0), and callers use
their torch path, which stays the specification these kernels are tested against bit for bit.

The kernels run on one thread, on contiguous CPU int64 ids and fp32 tables.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_kernels.c")
FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-std=c11")
MAX_PARTS = 8  # MAX_PARTS in cpu_kernels.c
KIND_HASH, KIND_ARITH = 0, 1
OUT_OF_RANGE_CODES = {"error": 0, "hash": 1}
SWITCH = "EMBTAB_CPU_KERNELS"
_NO_MEMORY = -2  # what embtab_pooled and embtab_transform return when malloc fails
_BAD_LENGTHS = -3  # what embtab_pooled returns for negative lengths or more than the ids


class _Transform(ctypes.Structure):
    _fields_ = [
        ("kind", ctypes.c_int64),
        ("key", ctypes.c_int64),
        ("limit", ctypes.c_int64),
        ("out_of_range", ctypes.c_int64),
        ("range_key", ctypes.c_int64),
        ("parts", ctypes.c_int64),
        ("divisors", ctypes.c_int64 * MAX_PARTS),
        ("moduli", ctypes.c_int64 * MAX_PARTS),
    ]


class _PooledTerm(ctypes.Structure):
    _fields_ = [
        ("transform", _Transform),
        ("feature", ctypes.c_int64),
        ("dim", ctypes.c_int64),
        ("tables", ctypes.c_void_p * MAX_PARTS),
        ("table_strides", ctypes.c_int64 * MAX_PARTS),
        ("output", ctypes.c_int64),
        ("column", ctypes.c_int64),
    ]


class _PooledBatch(ctypes.Structure):
    _fields_ = [
        ("ids", ctypes.c_void_p),
        ("id_count", ctypes.c_int64),
        ("lengths", ctypes.c_void_p),
        ("features", ctypes.c_int64),
        ("weights", ctypes.c_void_p),
        ("batch", ctypes.c_int64),
        ("outputs", ctypes.POINTER(ctypes.c_void_p)),
        ("output_strides", ctypes.POINTER(ctypes.c_int64)),
    ]


@dataclass(frozen=True)
class KernelTransform:
    """One lookup's index transform as the kernels take it: `hash`: bucket(id, key, moduli[0]);
    `arith`: ids outside [0, limit) an error or hashed in with `range_key` (`out_of_range`),
    then partition j's row (id // divisors[j]) % moduli[j]."""

    kind: str
    moduli: tuple[int, ...]
    key: int = 0
    divisors: tuple[int, ...] = (1,)
    limit: int = 0
    out_of_range: str = "error"
    range_key: int = 0

    @property
    def parts(self) -> int:
        return len(self.moduli)

    def _struct(self) -> _Transform:
        if not 1 <= self.parts <= MAX_PARTS or len(self.divisors) != self.parts:
            raise ValueError(
                f"a kernel transform takes 1 to {MAX_PARTS} partitions with one divisor each, "
                f"got moduli {self.moduli} and divisors {self.divisors}"
            )
        return _Transform(
            KIND_HASH if self.kind == "hash" else KIND_ARITH,
            self.key,
            self.limit,
            OUT_OF_RANGE_CODES[self.out_of_range],
            self.range_key,
            self.parts,
            (ctypes.c_int64 * MAX_PARTS)(*self.divisors),
            (ctypes.c_int64 * MAX_PARTS)(*self.moduli),
        )


class CpuKernels:
    """The loaded library: ids -> rows, and bags of ids -> pooled rows."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lib = ctypes.CDLL(str(path))
        self._lib.embtab_bucket.argtypes = [
            ctypes.c_void_p,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_void_p,
        ]
        self._lib.embtab_bucket.restype = None
        self._lib.embtab_transform.argtypes = [
            ctypes.POINTER(_Transform),
            ctypes.c_void_p,
            ctypes.c_int64,
            ctypes.c_void_p,
        ]
        self._lib.embtab_transform.restype = ctypes.c_int64
        self._lib.embtab_pooled.argtypes = [
            ctypes.POINTER(_PooledTerm),
            ctypes.c_int64,
            ctypes.POINTER(_PooledBatch),
            ctypes.POINTER(ctypes.c_int64),
        ]
        self._lib.embtab_pooled.restype = ctypes.c_int64

    def bucket_into(self, ids: torch.Tensor, key: int, num_rows: int, out: torch.Tensor) -> None:
        """out = bucket of every id with seed key `key` into `num_rows` rows (int64, CPU,
        contiguous; `out` may be `ids`)."""
        _check_ids(ids)
        _check_ids(out)
        if num_rows < 1 or out.numel() != ids.numel():
            raise ValueError(f"bucket_into needs num_rows >= 1 and an output of {ids.numel()} ids")
        self._lib.embtab_bucket(ids.data_ptr(), ids.numel(), key, num_rows, out.data_ptr())

    def transform(self, transform: KernelTransform, ids: torch.Tensor) -> torch.Tensor | int:
        """[parts, n] rows of every id, or the position of the first id out of range (an int)
        when the transform treats that as an error."""
        _check_ids(ids)
        rows = torch.empty((transform.parts, ids.numel()), dtype=torch.int64)
        bad = self._lib.embtab_transform(
            ctypes.byref(transform._struct()), ids.data_ptr(), ids.numel(), rows.data_ptr()
        )
        if bad == _NO_MEMORY:
            raise MemoryError("embtab_transform could not allocate its scratch rows")
        return rows if bad == -1 else int(bad)

    def pooled(
        self,
        terms: PooledTerms,
        ids: torch.Tensor,
        lengths: torch.Tensor,
        weights: torch.Tensor | None,
        outputs: Sequence[torch.Tensor],
    ) -> tuple[int, int] | None:
        """Run every term of `terms` over one batch in one call: `lengths` are the KJT's bag
        lengths, feature by feature (B each), and its bags run through `ids` in that order
        (weights indexed alike; None for weight 1); term k writes its columns of outputs[terms'
        output k] ([B, columns] fp32, strided rows, contiguous columns). None, or (term,
        position of the first id out of range) where its transform treats that as an error."""
        _check_ids(ids)
        _check_ids(lengths)
        if len(outputs) != len(terms.widths):
            raise ValueError(f"the terms write {len(terms.widths)} outputs, got {len(outputs)}")
        batch = outputs[0].shape[0] if outputs else 0
        for output, width in zip(outputs, terms.widths, strict=True):
            if (
                output.dtype != torch.float32
                or output.device.type != "cpu"
                or output.dim() != 2
                or output.shape[0] != batch
                or output.shape[1] < width
                or output.stride(1) != 1
            ):
                raise ValueError(
                    f"pooled outputs are fp32 CPU [B, columns] with contiguous columns and at "
                    f"least the terms' {terms.widths} columns; got {output.dtype} "
                    f"{tuple(output.shape)} (strides {output.stride()})"
                )
        features = lengths.numel() // batch if batch else terms.features
        if features < terms.features or features * batch != lengths.numel():
            raise ValueError(
                f"the terms read {terms.features} features of {batch} bags: B lengths per "
                f"feature are needed, got {lengths.numel()}"
            )
        if not (weights is None or _is_fp32_vector(weights) and weights.numel() == ids.numel()):
            raise ValueError("pooling weights are one contiguous fp32 CPU value per id, or None")
        pointers = (ctypes.c_void_p * len(outputs))(*(o.data_ptr() for o in outputs))
        strides = (ctypes.c_int64 * len(outputs))(*(o.stride(0) for o in outputs))
        call = _PooledBatch(
            ids.data_ptr(),
            ids.numel(),
            lengths.data_ptr(),
            features,
            None if weights is None else weights.data_ptr(),
            batch,
            pointers,
            strides,
        )
        failed = ctypes.c_int64(-1)
        bad = self._lib.embtab_pooled(
            terms.array, len(terms.array), ctypes.byref(call), ctypes.byref(failed)
        )
        if bad == _NO_MEMORY:
            raise MemoryError("embtab_pooled could not allocate its scratch rows")
        if bad == _BAD_LENGTHS:
            raise ValueError(
                f"bag lengths must be >= 0 and add up to at most the {ids.numel()} ids"
            )
        return None if bad == -1 else (failed.value, int(bad))


class PooledTerms:
    """The pooled terms of one kernel call, set once and run on batch after batch: term k pools
    bags of one feature through `transforms[k]`, each id's partition rows multiplied (one
    partition: the row), times its weight, into `dim` columns of one of the call's outputs.
    The caller checks `tables_moved` before each run (a table's storage may be replaced)."""

    def __init__(self, transforms: Sequence[KernelTransform]) -> None:
        self.transforms = tuple(transforms)
        self.array = (_PooledTerm * len(self.transforms))()
        for term, transform in zip(self.array, self.transforms, strict=True):
            term.transform = transform._struct()
        self.table_pointers: list[tuple[int, ...]] = [()] * len(self.transforms)
        self.widths: list[int] = []  # the columns each output needs
        self.features = 0  # how many features' bags the terms read

    def set_term(
        self, k: int, feature: int, tables: Sequence[torch.Tensor], output: int, column: int
    ) -> None:
        """Term k reads the bags of the call's feature `feature`, the rows of tables[j] for
        partition j ([rows, dim] fp32 CPU, strided rows, contiguous columns), and writes columns
        [column, column + dim) of output `output`."""
        dim = tables[0].shape[1] if tables else 0
        if (
            len(tables) != self.transforms[k].parts
            or feature < 0
            or output < 0
            or column < 0
            or any(
                t.dtype != torch.float32
                or t.device.type != "cpu"
                or t.dim() != 2
                or t.stride(1) != 1
                or t.shape[1] != dim
                for t in tables
            )
        ):
            raise ValueError(
                "a pooled term takes one fp32 CPU [rows, dim] table per partition (contiguous "
                f"columns, one dim) and a feature, output and column >= 0; got {len(tables)} "
                f"tables for {self.transforms[k].parts} partitions, feature {feature}, output "
                f"{output}, column {column}"
            )
        term = self.array[k]
        term.feature = feature
        term.dim = dim
        for j, table in enumerate(tables):
            term.tables[j] = table.data_ptr()
            term.table_strides[j] = table.stride(0)
        term.output = output
        term.column = column
        self.table_pointers[k] = tuple(table.data_ptr() for table in tables)
        while len(self.widths) <= output:
            self.widths.append(0)
        self.widths[output] = max(self.widths[output], column + dim)
        self.features = max(self.features, feature + 1)

    def tables_moved(self, tables: Sequence[Sequence[torch.Tensor]]) -> bool:
        """Whether any term's tables (tables[k], as `set_term` took them) now live elsewhere
        than where the terms point: then the terms must be set again before they run."""
        return any(
            tuple(table.data_ptr() for table in now) != then
            for now, then in zip(tables, self.table_pointers, strict=True)
        )


def _is_fp32_vector(weights: torch.Tensor) -> bool:
    return (
        weights.dtype == torch.float32 and weights.is_contiguous() and weights.device.type == "cpu"
    )


def _check_ids(ids: torch.Tensor) -> None:
    if ids.dtype != torch.int64 or ids.device.type != "cpu" or not ids.is_contiguous():
        raise ValueError(
            f"the CPU kernels take contiguous int64 CPU tensors, got {ids.dtype} on "
            f"{ids.device} (contiguous: {ids.is_contiguous()})"
        )


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "embtab" / "kernels"


def _cpu_identity() -> str:
    """What -march=native depends on: the CPU's model and flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    wanted = [line for line in lines if line.startswith(("model name", "flags"))][:2]
    return "\n".join(wanted) or platform.processor()


def build(compiler: str) -> Path:
    """The compiled library for `compiler`, built into the cache unless it is there."""
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, check=True
    ).stdout
    digest = hashlib.sha256(
        "\0".join([SOURCE.read_text(), " ".join(FLAGS), version, _cpu_identity()]).encode()
    ).hexdigest()[:16]
    target = _cache_dir() / f"embtab_cpu_kernels-{digest}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        subprocess.run(
            [compiler, *FLAGS, str(SOURCE), "-o", str(built)],
            capture_output=True,
            text=True,
            check=True,
        )
        os.replace(built, target)  # atomic: concurrent first uses agree on one file
    return target


def library() -> CpuKernels | None:
    """The kernels, built on first use; None where EMBTAB_CPU_KERNELS=0 turns them off (read
    on every call) or they cannot be built (after one warning)."""
    if os.environ.get(SWITCH, "1") == "0":
        return None
    return built_library()


@cache
def built_library() -> CpuKernels | None:
    """The kernels built (or found in the cache) once per process; None, after one warning,
    where there is no compiler or the build fails."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        warnings.warn(
            "embtab: no C compiler (cc, gcc or $CC) found; CPU lookups use the slower torch "
            "index transforms",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    try:
        return CpuKernels(build(compiler))
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", "") or str(error)
        warnings.warn(
            f"embtab: the CPU kernels could not be built with {compiler} ({detail.strip()}); "
            "CPU lookups use the slower torch index transforms",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
