"""Which lookup runs the static tables of a collection: one switch, read when it is built.

Backends (the value `lookup_backend` returns, also `EmbeddingCollection.backend`):

- `fbgemm`: fbgemm's table-batched lookup (`lookup.TableBatchedLookup`) with the sparse
  optimizer fused into its backward. Chosen by default where fbgemm has TBE kernels for the
  device: CPU always, CUDA only with fbgemm-gpu's CUDA build (the project pins the CPU one).
- `torch`: the same tables looked up with torch ops (`torch_lookup.TorchLookup`), the same
  sparse optimizer applied in its backward; runs on any device. The default where fbgemm has
  no kernels (CUDA with fbgemm-gpu-cpu), and forced everywhere by EMBTAB_LOOKUP=torch, which is
  how CI runs it on CPU.
- `triton`: the fused Triton kernels (`kernels.group.FusedTableGroup`), on CUDA only and only
  with EMBTAB_LOOKUP=triton: they have not run on a GPU yet. CPU collections ignore it.

With `optimizer=None` the `fbgemm` and `torch` backends both train plain nn.Parameters through
the torch lookup (fbgemm's TBE has no dense-gradient mode here).
"""

from __future__ import annotations

import os

from embedding_tables.errors import BackendError
from embedding_tables.kernels import triton_available
from embedding_tables.lookup import fbgemm_has_kernels

LOOKUP_SWITCH = "EMBTAB_LOOKUP"
# Accepted values of the switch (unset is "auto") and what each asks for.
LOOKUP_SWITCH_VALUES = {
    "auto": "fbgemm's TBE where it has kernels for the device, the torch lookup elsewhere",
    "torch": "the torch lookup on every device",
    "triton": "the fused Triton kernels on CUDA, auto elsewhere",
}


def lookup_backend(device_type: str) -> str:
    """`fbgemm`, `torch` or `triton` for static tables on a `device_type` device, following
    EMBTAB_LOOKUP (see the module docstring). A value not accepted raises, as does asking for
    Triton where it is not installed, so that no switch silently runs another path."""
    value = os.environ.get(LOOKUP_SWITCH, "auto")
    if value not in LOOKUP_SWITCH_VALUES:
        accepted = "; ".join(f"{k!r} ({v})" for k, v in LOOKUP_SWITCH_VALUES.items())
        raise BackendError(
            f"{LOOKUP_SWITCH}={value!r}: accepted values are {accepted}; unset is 'auto'"
        )
    if value == "torch":
        return "torch"
    if value == "triton" and device_type == "cuda":
        if not triton_available():
            raise BackendError(
                f"{LOOKUP_SWITCH}=triton asks for the fused Triton kernels, but Triton is not "
                f"installed; install it (CUDA builds of torch bring it) or unset {LOOKUP_SWITCH}"
            )
        return "triton"
    return "fbgemm" if fbgemm_has_kernels(device_type) else "torch"
