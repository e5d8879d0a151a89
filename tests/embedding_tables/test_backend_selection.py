"""Which lookups a collection runs (`embedding_tables.backend`): fbgemm's TBE where fbgemm has
kernels for the device, the torch lookup elsewhere or with EMBTAB_LOOKUP=torch, the fused Triton
kernels only on CUDA with EMBTAB_LOOKUP=triton (no CUDA here: selected by device type)."""

from __future__ import annotations

import pytest

import embedding_tables.backend as backend
import embedding_tables.collection as collection_module
from embedding_tables import BackendError, EmbeddingCollection, SparseOptimizerConfig
from embedding_tables.lookup import TableBatchedLookup, fbgemm_has_kernels
from embedding_tables.torch_lookup import TorchLookup
from tests.embedding_tables.helpers import method_case


@pytest.fixture
def triton_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backend, "triton_available", lambda: True)


@pytest.fixture
def fbgemm_cuda(monkeypatch: pytest.MonkeyPatch):
    """Sets whether fbgemm has CUDA kernels (CPU kernels stay as installed)."""

    def set_available(available: bool) -> None:
        monkeypatch.setattr(
            backend,
            "fbgemm_has_kernels",
            lambda device_type: (
                available if device_type == "cuda" else fbgemm_has_kernels(device_type)
            ),
        )

    return set_available


def test_the_pinned_fbgemm_has_cpu_kernels_and_no_cuda_ones() -> None:
    assert fbgemm_has_kernels("cpu") is True
    assert fbgemm_has_kernels("cuda") is False
    assert fbgemm_has_kernels("mps") is False


@pytest.mark.parametrize("switch", [None, "auto"], ids=["unset", "auto"])
@pytest.mark.parametrize(
    "device_type, fbgemm_on_cuda, expected",
    [
        ("cpu", False, "fbgemm"),
        ("cuda", False, "torch"),
        ("cuda", True, "fbgemm"),
        ("mps", False, "torch"),
    ],
)
def test_default_is_fbgemm_where_it_has_kernels_and_torch_elsewhere(
    triton_installed,
    fbgemm_cuda,
    monkeypatch: pytest.MonkeyPatch,
    switch: str | None,
    device_type: str,
    fbgemm_on_cuda: bool,
    expected: str,
) -> None:
    if switch is None:
        monkeypatch.delenv(backend.LOOKUP_SWITCH, raising=False)
    else:
        monkeypatch.setenv(backend.LOOKUP_SWITCH, switch)
    fbgemm_cuda(fbgemm_on_cuda)
    assert backend.lookup_backend(device_type) == expected


@pytest.mark.parametrize("fbgemm_on_cuda", [False, True])
@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_torch_switch_forces_the_torch_lookup_everywhere(
    fbgemm_cuda, monkeypatch: pytest.MonkeyPatch, device_type: str, fbgemm_on_cuda: bool
) -> None:
    monkeypatch.setenv(backend.LOOKUP_SWITCH, "torch")
    fbgemm_cuda(fbgemm_on_cuda)
    assert backend.lookup_backend(device_type) == "torch"


def test_triton_switch_selects_triton_on_cuda_only(
    triton_installed, fbgemm_cuda, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(backend.LOOKUP_SWITCH, "triton")
    fbgemm_cuda(False)
    assert backend.lookup_backend("cuda") == "triton"
    assert backend.lookup_backend("cpu") == "fbgemm"


def test_triton_switch_without_triton_is_a_typed_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backend, "triton_available", lambda: False)
    monkeypatch.setenv(backend.LOOKUP_SWITCH, "triton")
    with pytest.raises(BackendError, match=r"EMBTAB_LOOKUP=triton .*Triton is not installed"):
        backend.lookup_backend("cuda")


@pytest.mark.parametrize("value", ["1", "TORCH", "fbgemm", "", " torch"])
@pytest.mark.parametrize("device_type", ["cuda", "cpu"])
def test_a_bad_switch_value_names_the_accepted_ones(
    monkeypatch: pytest.MonkeyPatch, value: str, device_type: str
) -> None:
    monkeypatch.setenv(backend.LOOKUP_SWITCH, value)
    with pytest.raises(
        BackendError,
        match=rf"EMBTAB_LOOKUP={value!r}: accepted values are 'auto' .*'torch' .*'triton'",
    ):
        backend.lookup_backend(device_type)


def test_a_bad_switch_value_stops_the_collection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(backend.LOOKUP_SWITCH, "on")
    tables, feature_to_table = method_case("mixed")
    with pytest.raises(BackendError, match="accepted values"):
        EmbeddingCollection(tables, feature_to_table)


@pytest.mark.parametrize(
    "switch, optimizer, expected_backend, expected_lookup",
    [
        (None, SparseOptimizerConfig("sgd", lr=0.1), "fbgemm", TableBatchedLookup),
        (None, None, "fbgemm", TorchLookup),
        ("triton", SparseOptimizerConfig("sgd", lr=0.1), "fbgemm", TableBatchedLookup),
        ("torch", SparseOptimizerConfig("sgd", lr=0.1), "torch", TorchLookup),
        ("torch", None, "torch", TorchLookup),
    ],
)
def test_cpu_collections_build_the_selected_lookups(
    triton_installed,
    monkeypatch: pytest.MonkeyPatch,
    switch: str | None,
    optimizer: SparseOptimizerConfig | None,
    expected_backend: str,
    expected_lookup: type,
) -> None:
    if switch is None:
        monkeypatch.delenv(backend.LOOKUP_SWITCH, raising=False)
    else:
        monkeypatch.setenv(backend.LOOKUP_SWITCH, switch)
    tables, feature_to_table = method_case("mixed")
    ec = EmbeddingCollection(tables, feature_to_table, optimizer=optimizer)
    assert ec.backend == expected_backend
    assert ec.tables.lookups
    assert all(isinstance(lookup, expected_lookup) for lookup in ec.tables.lookups)
    assert all(lookup.optimizer == ec.optimizer_config for lookup in ec.tables.lookups)


def test_a_cuda_collection_without_fbgemm_cuda_builds_torch_lookups(
    fbgemm_cuda, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a CUDA collection builds by default, with the device type selected as CUDA (the
    tables themselves still live on the CPU here)."""
    monkeypatch.delenv(backend.LOOKUP_SWITCH, raising=False)
    fbgemm_cuda(False)
    monkeypatch.setattr(
        collection_module, "lookup_backend", lambda device_type: backend.lookup_backend("cuda")
    )
    tables, feature_to_table = method_case("mixed")
    ec = EmbeddingCollection(tables, feature_to_table, optimizer=SparseOptimizerConfig())
    assert ec.backend == "torch"
    assert all(isinstance(lookup, TorchLookup) for lookup in ec.tables.lookups)
    assert list(ec.parameters()) == []
