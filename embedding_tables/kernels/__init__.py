"""Fused Triton kernels for the static methods (full, hash, unified, qr, graphhash rows).

One launch per table group does, per chunk of ids: the index transform (the same splitmix64
hash as `embedding_tables.hashing`, unified's per-feature seeds, qr digits), the gathers, the
combine (qr mult/add/concat) and the pooling (sum/mean, per-sample weights), or writes the
unpooled rows; the backward applies row-wise Adagrad or SGD to the touched rows without a dense
gradient. `EmbeddingCollection` uses them for CUDA tensors only when `EMBTAB_LOOKUP=triton` opts
in (`embedding_tables.backend`): they pass their interpreter-mode tests but have not yet run on
a GPU.

- `layout`: the flat-buffer placement and the kernels' metadata (torch only);
- `triton_kernels`: the kernels; `ops`: their launchers; `group`: `FusedTableGroup`, the module.

Importing this package does not import Triton: CPU-only installs work without it, and
`triton_available()` says whether the submodules that need it (`ops`, `group`,
`triton_kernels`) can be imported.
"""

from __future__ import annotations

import importlib.util


def triton_available() -> bool:
    """Whether Triton is installed (the kernels then run on CUDA, or on CPU tensors under
    TRITON_INTERPRET=1)."""
    return importlib.util.find_spec("triton") is not None
