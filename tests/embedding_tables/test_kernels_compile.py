"""The fused kernels compile for Hopper (sm_90) without a GPU: Triton's LLVM and its bundled
ptxas build the cubin here. Every kind of specialisation the launchers use must compile, rows
must load as 16-byte vectors, and nothing may spill to local memory.

The interpreter tests check what the kernels compute; this checks what a GPU would run.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

triton = pytest.importorskip(
    "triton", reason="Triton is not installed (pip install -e '.[dev]'); the kernel tests need it"
)
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("compiles real kernels: run without TRITON_INTERPRET", allow_module_level=True)

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from embedding_tables.kernels import triton_kernels as kernels  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
VECTOR_LOAD = "ld.global.v4.b32"  # 16 bytes

FORWARD_TYPES = {
    "ids_ptr": "*i64",
    "offsets_ptr": "*i64",
    "sample_weights_ptr": "*fp32",
    "given_rows_ptr": "*i64",
    "out_ptr": "*fp32",
    "entry_rows_ptr": "*i32",
    "entry_refs_ptr": "*i64",
    "position_rows_ptr": "*i32",
    "position_scales_ptr": "*fp32",
    "errors_ptr": "*i32",
    "segment_meta_ptr": "*i64",
    "lookup_meta_ptr": "*i64",
    "segment_call_ptr": "*i64",
    "lookup_call_ptr": "*i64",
    "num_ids": "i64",
    "num_offsets": "i64",
}
REDUCE_TYPES = {
    "grad_ptr": "*fp32",
    "sorted_rows_ptr": "*i32",
    "order_ptr": "*i64",
    "item_starts_ptr": "*i64",
    "entry_rows_ptr": "*i32",
    "entry_refs_ptr": "*i64",
    "position_rows_ptr": "*i32",
    "position_scales_ptr": "*fp32",
    "momentum_ptr": "*fp32",
    "dense_grad_ptr": "*fp32",
    "partials_ptr": "*fp32",
    "touched_ptr": "*u8",
    "segment_meta_ptr": "*i64",
    "lookup_meta_ptr": "*i64",
    "segment_call_ptr": "*i64",
    "lookup_call_ptr": "*i64",
    "num_items": "i64",
    "num_entries": "i64",
    "max_partners": "i64",
    "learning_rate": "fp32",
    "eps": "fp32",
}
APPLY_TYPES = {
    "partials_ptr": "*fp32",
    "run_first_items_ptr": "*i64",
    "run_item_counts_ptr": "*i64",
    "item_starts_ptr": "*i64",
    "sorted_rows_ptr": "*i32",
    "order_ptr": "*i64",
    "entry_refs_ptr": "*i64",
    "lookup_meta_ptr": "*i64",
    "momentum_ptr": "*fp32",
    "dense_grad_ptr": "*fp32",
    "num_runs": "i64",
    "learning_rate": "fp32",
    "eps": "fp32",
}


def forward(weights: str, align: int, **constexprs) -> tuple:
    flags = {
        "POOLED": True,
        "HAS_SAMPLE_WEIGHTS": False,
        "HAS_GIVEN": False,
        "SAVE": False,
        "SAVE_SCALES": False,
        "EVEN_D": True,
        "ROW_ALIGN": align,
    }
    flags.update(constexprs)
    types = {**FORWARD_TYPES, "weights_ptr": weights}
    return kernels.fused_lookup_kernel, types, flags


def reduce(weights: str, align: int, **constexprs) -> tuple:
    flags = {
        "HAS_SCALES": False,
        "HAS_MULT": False,
        "FUSE_UPDATE": True,
        "OPTIMIZER": 2,
        "EVEN_D": True,
        "ROW_ALIGN": align,
    }
    flags.update(constexprs)
    types = {**REDUCE_TYPES, "weights_ptr": weights}
    return kernels.reduce_row_gradients_kernel, types, flags


# (name, (kernel, types, constexprs), warps, whether its rows must load as 16-byte vectors)
SPECIALISATIONS = [
    (
        "forward fp32 d128 bag 32",
        forward("*fp32", 4, BLOCK_BAGS=1, BLOCK_IDS=32, BLOCK_D=128),
        8,
        True,
    ),
    (
        "forward fp16 d256 bag 32",
        forward("*fp16", 8, BLOCK_BAGS=1, BLOCK_IDS=32, BLOCK_D=256),
        8,
        True,
    ),
    (
        "forward bf16 d16 bag 1",
        forward("*bf16", 8, BLOCK_BAGS=256, BLOCK_IDS=1, BLOCK_D=16),
        8,
        False,
    ),
    (
        "forward saving, weighted, given rows, mixed dims",
        forward(
            "*fp32",
            4,
            HAS_SAMPLE_WEIGHTS=True,
            HAS_GIVEN=True,
            SAVE=True,
            SAVE_SCALES=True,
            EVEN_D=False,
            BLOCK_BAGS=2,
            BLOCK_IDS=32,
            BLOCK_D=64,
        ),
        8,
        True,
    ),
    (
        "sequence saving",
        forward("*fp16", 8, POOLED=False, SAVE=True, BLOCK_BAGS=64, BLOCK_IDS=1, BLOCK_D=64),
        8,
        True,
    ),
    (
        "reduce + fused Adagrad fp32 d128",
        reduce("*fp32", 4, BLOCK_ITEMS=4, BLOCK_ENTRIES=4, BLOCK_D=128),
        8,
        True,
    ),
    (
        "reduce qr mult, SGD after, fp16 mixed dims",
        reduce(
            "*fp16",
            8,
            HAS_SCALES=True,
            HAS_MULT=True,
            FUSE_UPDATE=False,
            OPTIMIZER=1,
            EVEN_D=False,
            BLOCK_ITEMS=4,
            BLOCK_ENTRIES=4,
            BLOCK_D=128,
        ),
        8,
        True,
    ),
    (
        "reduce, dense gradient, bf16",
        reduce(
            "*bf16",
            8,
            FUSE_UPDATE=False,
            OPTIMIZER=0,
            BLOCK_ITEMS=16,
            BLOCK_ENTRIES=8,
            BLOCK_D=16,
        ),
        4,
        False,
    ),
    (
        "apply Adagrad fp32 d256",
        (
            kernels.apply_row_updates_kernel,
            {**APPLY_TYPES, "weights_ptr": "*fp32"},
            {
                "OPTIMIZER": 2,
                "EVEN_D": True,
                "ROW_ALIGN": 4,
                "BLOCK_RUNS": 1,
                "BLOCK_PARTIALS": 8,
                "BLOCK_D": 256,
            },
        ),
        4,
        True,
    ),
    (
        "hash",
        (
            kernels.bucket_kernel,
            {"ids_ptr": "*i64", "out_ptr": "*i64", "params_ptr": "*i64", "num_ids": "i64"},
            {"BLOCK": 1024},
        ),
        4,
        False,
    ),
]


def compile_for_hopper(kernel, types: dict, constexprs: dict, num_warps: int):
    signature = {
        name: "constexpr" if name in constexprs else types[name] for name in kernel.arg_names
    }
    pointers = [i for i, name in enumerate(kernel.arg_names) if signature[name].startswith("*")]
    attrs = {(i,): [["tt.divisibility", 16]] for i in pointers}
    source = ASTSource(kernel, signature, constexprs, attrs)
    options = {"num_warps": num_warps, "enable_fp_fusion": True}
    return triton.compile(source, target=HOPPER, options=options)


def local_memory_bytes(cubin: bytes, tmp_path: Path) -> int | None:
    """STACK + LOCAL bytes per thread from Triton's bundled cuobjdump (None without it)."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return None
    path = tmp_path / "kernel.cubin"
    path.write_bytes(cubin)
    usage = subprocess.run(
        [str(tool), "--dump-resource-usage", str(path)], capture_output=True, text=True
    ).stdout
    found = re.search(r"STACK:(\d+).*LOCAL:(\d+)", usage)
    assert found, usage
    return int(found.group(1)) + int(found.group(2))


@pytest.mark.parametrize(
    "specialisation, warps, vectorised",
    [(spec, warps, vectorised) for _, spec, warps, vectorised in SPECIALISATIONS],
    ids=[name for name, *_ in SPECIALISATIONS],
)
def test_kernel_compiles_for_hopper_without_spills(
    specialisation, warps: int, vectorised: bool, tmp_path: Path
) -> None:
    kernel, types, constexprs = specialisation
    compiled = compile_for_hopper(kernel, types, constexprs, warps)
    if vectorised:
        assert VECTOR_LOAD in compiled.asm["ptx"], "rows no longer load as 16-byte vectors"
    spilled = local_memory_bytes(compiled.asm["cubin"], tmp_path)
    assert spilled in (0, None), f"{spilled} bytes of local memory per thread (spills)"
