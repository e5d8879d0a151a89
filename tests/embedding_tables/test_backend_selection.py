"""Which lookups a collection runs: the fused Triton kernels only on CUDA with EMBTAB_TRITON=1,
the torch / fbgemm lookups otherwise (no CUDA here: the selection is tested by device type)."""

from __future__ import annotations

import pytest
import torch

import embedding_tables.collection as collection_module
import embedding_tables.kernels as kernels
from embedding_tables import BackendError, EmbeddingCollection, SparseOptimizerConfig
from embedding_tables.lookup import TableBatchedLookup, TorchLookup
from tests.embedding_tables.helpers import method_case


@pytest.fixture
def triton_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "triton_available", lambda: True)


@pytest.mark.parametrize("switch", [None, "0"], ids=["unset", "0"])
@pytest.mark.parametrize("device_type", ["cuda", "cpu"])
def test_default_is_not_triton_even_where_it_is_installed(
    triton_installed, monkeypatch: pytest.MonkeyPatch, switch: str | None, device_type: str
) -> None:
    if switch is None:
        monkeypatch.delenv(kernels.TRITON_SWITCH, raising=False)
    else:
        monkeypatch.setenv(kernels.TRITON_SWITCH, switch)
    assert kernels.use_triton(device_type) is False
    assert collection_module._use_kernels(torch.device(device_type)) is False


def test_opting_in_selects_triton_on_cuda_only(
    triton_installed, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(kernels.TRITON_SWITCH, "1")
    assert kernels.use_triton("cuda") is True
    assert collection_module._use_kernels(torch.device("cuda", 0)) is True
    assert kernels.use_triton("cpu") is False


def test_opting_in_without_triton_is_a_typed_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "triton_available", lambda: False)
    monkeypatch.setenv(kernels.TRITON_SWITCH, "1")
    with pytest.raises(BackendError, match=r"EMBTAB_TRITON=1 .*Triton is not installed"):
        kernels.use_triton("cuda")


@pytest.mark.parametrize("value", ["true", "yes", "2", "", " 1"])
@pytest.mark.parametrize("device_type", ["cuda", "cpu"])
def test_a_bad_switch_value_names_the_accepted_ones(
    triton_installed, monkeypatch: pytest.MonkeyPatch, value: str, device_type: str
) -> None:
    monkeypatch.setenv(kernels.TRITON_SWITCH, value)
    with pytest.raises(
        BackendError, match=rf"EMBTAB_TRITON={value!r}: accepted values are '1' .* '0' or unset"
    ):
        kernels.use_triton(device_type)


def test_a_bad_switch_value_stops_the_collection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(kernels.TRITON_SWITCH, "on")
    tables, feature_to_table = method_case("mixed")
    with pytest.raises(BackendError, match="accepted values"):
        EmbeddingCollection(tables, feature_to_table)


@pytest.mark.parametrize("optimizer", [SparseOptimizerConfig("sgd", lr=0.1), None])
def test_cpu_collections_keep_the_torch_lookups_when_opted_in(
    triton_installed, monkeypatch: pytest.MonkeyPatch, optimizer: SparseOptimizerConfig | None
) -> None:
    monkeypatch.setenv(kernels.TRITON_SWITCH, "1")
    tables, feature_to_table = method_case("mixed")
    ec = EmbeddingCollection(tables, feature_to_table, optimizer=optimizer)
    expected = TorchLookup if optimizer is None else TableBatchedLookup
    assert ec.tables.lookups
    assert all(isinstance(lookup, expected) for lookup in ec.tables.lookups)
