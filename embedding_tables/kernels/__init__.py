"""Fused Triton kernels for the static methods (full, hash, unified, qr, graphhash rows).

One launch per table group does, per chunk of ids: the index transform (the same splitmix64
hash as `embedding_tables.hashing`, unified's per-feature seeds, qr digits), the gathers, the
combine (qr mult/add/concat) and the pooling (sum/mean, per-sample weights), or writes the
unpooled rows; the backward applies row-wise Adagrad or SGD to the touched rows without a dense
gradient. `EmbeddingCollection` uses them for CUDA tensors only when `EMBTAB_TRITON=1` opts in
(`use_triton`): they pass their interpreter-mode tests but have not yet run on a GPU.

- `layout`: the flat-buffer placement and the kernels' metadata (torch only);
- `triton_kernels`: the kernels; `ops`: their launchers; `group`: `FusedTableGroup`, the module.

Importing this package does not import Triton: CPU-only installs work without it, and
`triton_available()` says whether the submodules that need it (`ops`, `group`,
`triton_kernels`) can be imported.
"""

from __future__ import annotations

import importlib.util
import os

from embedding_tables.errors import BackendError

TRITON_SWITCH = "EMBTAB_TRITON"
# Value of the switch -> whether it opts in; unset is "0".
TRITON_SWITCH_VALUES = {"0": False, "1": True}


def triton_available() -> bool:
    """Whether Triton is installed (the kernels then run on CUDA, or on CPU tensors under
    TRITON_INTERPRET=1)."""
    return importlib.util.find_spec("triton") is not None


def use_triton(device_type: str) -> bool:
    """Whether static tables on a `device_type` device run the fused Triton kernels: only on
    CUDA and only with EMBTAB_TRITON=1, since the kernels have not run on a GPU yet; otherwise
    the torch / fbgemm lookups CPU uses. A value other than "0" or "1" raises, as does opting in
    without Triton, so that neither silently runs the other path."""
    value = os.environ.get(TRITON_SWITCH, "0")
    if value not in TRITON_SWITCH_VALUES:
        raise BackendError(
            f"{TRITON_SWITCH}={value!r}: accepted values are '1' (CUDA lookups through the "
            "fused Triton kernels) and '0' or unset (the torch / fbgemm lookups, the default)"
        )
    if device_type != "cuda" or not TRITON_SWITCH_VALUES[value]:
        return False
    if not triton_available():
        raise BackendError(
            f"{TRITON_SWITCH}=1 asks for the fused Triton kernels, but Triton is not installed; "
            f"install it (CUDA builds of torch bring it) or set {TRITON_SWITCH}=0"
        )
    return True
