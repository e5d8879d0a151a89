"""`lookup_backend`: runs a test once per backend of the plain physical tables on CPU, fbgemm's TBE
(the CPU default) and the torch lookup (EMBTAB_LOOKUP=torch, the CUDA default without
fbgemm-gpu's CUDA build)."""

from __future__ import annotations

import pytest

from embedding_tables.backend import LOOKUP_SWITCH


@pytest.fixture(params=["fbgemm", "torch"])
def lookup_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The backend collections built in the test get (check `ec.backend` against it)."""
    if request.param == "torch":
        monkeypatch.setenv(LOOKUP_SWITCH, "torch")
    else:
        monkeypatch.delenv(LOOKUP_SWITCH, raising=False)
    return request.param
