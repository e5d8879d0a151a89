"""GraphHash on small planted-community graphs: budget, determinism, fallback, save/load, assign."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from embedding_tables.errors import BudgetError, ConfigError, IdError
from embedding_tables.graphhash import (
    EmptyGraphError,
    GraphHashMapping,
    MappingFormatError,
    build_graphhash,
    mappings_from_tensors,
    mappings_to_tensors,
)
from embedding_tables.hashing import bucket

USER_BASE, ITEM_BASE = 10_000, 50_000


def planted_graph(
    communities: int = 4, users_each: int = 40, items_each: int = 25, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Users mostly interact with items of their own community; ids are sparse raw ids."""
    rng = np.random.default_rng(seed)
    users, items = [], []
    for community in range(communities):
        for user in range(users_each):
            user_id = USER_BASE + 7 * (community * users_each + user)
            own = rng.choice(items_each, size=8, replace=False) + community * items_each
            stray = rng.integers(0, communities * items_each, size=1)
            for item in np.concatenate([own, stray]):
                users.append(user_id)
                items.append(ITEM_BASE + 3 * int(item))
    return np.array(users), np.array(items)


def community_of_user(user_id: int, users_each: int = 40) -> int:
    return (user_id - USER_BASE) // 7 // users_each


def test_tables_are_exactly_the_budget_and_communities_share_rows() -> None:
    users, items = planted_graph()
    build = build_graphhash(users, items, budget_rows=(20, 12), seed=1)
    report = build.report
    assert build.user.num_rows == report.user_rows == 20
    assert build.item.num_rows == report.item_rows == 12
    assert 4 <= report.num_user_clusters <= 19  # 5% of 20 -> 1 hash row
    assert report.num_item_clusters <= 11
    assert report.modularity > 0.3  # filling the budget splits communities: lower than at 4
    assert report.user_coverage == report.item_coverage == 1.0
    known_users = torch.from_numpy(np.unique(users))
    rows = build.user.transform(known_users)
    assert int(rows.max()) < build.user.num_cluster_rows
    # every cluster row holds users of a single planted community
    communities = torch.tensor([community_of_user(int(u)) for u in known_users])
    for row in rows.unique():
        assert communities[rows == row].unique().numel() == 1


def test_deterministic_for_a_seed() -> None:
    users, items = planted_graph()
    first = build_graphhash(users, items, budget_rows=30, seed=5)
    second = build_graphhash(users, items, budget_rows=30, seed=5)
    assert first.report == second.report
    for side in ("user", "item"):
        tensors_a, meta_a = getattr(first, side).to_tensors()
        tensors_b, meta_b = getattr(second, side).to_tensors()
        assert meta_a == meta_b
        assert all(torch.equal(tensors_a[key], tensors_b[key]) for key in tensors_a)
    unseen = torch.arange(1, 200)
    assert torch.equal(first.user.transform(unseen), second.user.transform(unseen))


def test_unseen_ids_fall_back_to_the_hash_rows() -> None:
    users, items = planted_graph()
    build = build_graphhash(users, items, budget_rows=40, seed=3)
    mapping = build.user
    unseen = torch.tensor([1, 2, 3, USER_BASE + 1, -99, 2**40])
    rows = mapping.transform(unseen)
    assert bool((rows >= mapping.num_cluster_rows).all())
    assert bool((rows < mapping.num_rows).all())
    expected = mapping.num_cluster_rows + bucket(unseen, 3, mapping.num_hash_rows)
    assert torch.equal(rows, expected)
    assert mapping.coverage(torch.tensor([USER_BASE, 1])) == 0.5
    assert mapping.clusters_of(torch.tensor([1])).tolist() == [-1]


def test_double_variant_adds_a_hashed_row() -> None:
    users, items = planted_graph()
    build = build_graphhash(users, items, budget_rows=40, seed=0, variant="double")
    mapping = build.item
    assert mapping.num_hash_rows >= 20  # half the budget is hashing
    ids = torch.from_numpy(np.unique(items)[:10])
    both = mapping.transform_all(ids)
    assert both.shape == (10, 2)
    assert bool((both[:, 0] < mapping.num_cluster_rows).all())
    assert bool((both[:, 1] >= mapping.num_cluster_rows).all())
    assert mapping.rows_per_id == 2
    with pytest.raises(ConfigError, match="double variant"):
        build_graphhash(users, items, budget_rows=40).item.transform_hashed(ids)


def test_budget_below_the_components_says_the_minimum() -> None:
    # ten disconnected user-item pairs: no clustering can use fewer than ten clusters a side
    users = np.arange(10) + USER_BASE
    items = np.arange(10) + ITEM_BASE
    with pytest.raises(BudgetError, match="minimum budget is 11 rows for 'user_id'"):
        build_graphhash(users, items, budget_rows=8)
    with pytest.raises(BudgetError, match="the minimum is 2 rows"):
        build_graphhash(users, items, budget_rows=1)
    assert build_graphhash(users, items, budget_rows=11).report.num_clusters == 10


def test_bad_input_names_the_feature() -> None:
    empty = np.array([], dtype=np.int64)
    with pytest.raises(EmptyGraphError, match="'viewer' x 'video' has no edges"):
        build_graphhash(empty, empty, 10, user_feature="viewer", item_feature="video")
    with pytest.raises(IdError, match="each interaction needs one of each"):
        build_graphhash(np.array([1, 2]), np.array([1]), 10)
    with pytest.raises(IdError, match="must be integers"):
        build_graphhash(np.array([1.5]), np.array([1]), 10)


def test_square_graphs_are_read_as_bipartite() -> None:
    users = np.array([0, 0, 1, 1, 2, 2])
    items = np.array([0, 1, 0, 1, 2, 2])  # 3 users x 3 items
    build = build_graphhash(users, items, budget_rows=3)  # 2 cluster rows + 1 hash row
    assert build.report.num_clusters == 2
    assert build.user.transform(torch.tensor([0, 1])).unique().numel() == 1


def test_save_and_load_as_safetensors(tmp_path: Path) -> None:
    users, items = planted_graph()
    build = build_graphhash(users, items, budget_rows=30, variant="double", seed=2)
    tensors, metadata = mappings_to_tensors({"user_id": build.user, "item_id": build.item})
    path = tmp_path / "graphhash.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        loaded_metadata = handle.metadata()
    loaded = mappings_from_tensors(load_file(str(path)), loaded_metadata)
    probe = torch.cat([torch.from_numpy(np.unique(users)), torch.arange(100)])
    assert torch.equal(loaded["user_id"].transform_all(probe), build.user.transform_all(probe))
    assert loaded["item_id"].variant == "double"

    with pytest.raises(MappingFormatError, match="version '2'"):
        mappings_from_tensors(tensors, dict(metadata, version="2"))


def test_state_dict_round_trip_into_a_placeholder() -> None:
    users, items = planted_graph()
    mapping = build_graphhash(users, items, budget_rows=30, seed=4).user
    placeholder = GraphHashMapping.empty("user_id")
    placeholder.load_state_dict(mapping.state_dict())
    probe = torch.cat([torch.from_numpy(np.unique(users)), torch.arange(50)])
    assert torch.equal(placeholder.transform(probe), mapping.transform(probe))
    assert placeholder.num_rows == mapping.num_rows and placeholder.seed == 4
    broken = dict(mapping.state_dict(), meta=torch.tensor([9, 0, 4, 1]))
    with pytest.raises(MappingFormatError, match="version 9"):
        placeholder.load_state_dict(broken)


def test_assign_puts_a_new_id_with_most_of_its_neighbours() -> None:
    users, items = planted_graph()
    build = build_graphhash(users, items, budget_rows=30, seed=0)
    known_items = torch.from_numpy(np.unique(items))
    item_labels = build.item.clusters_of(known_items)
    member = torch.tensor([USER_BASE + 7 * 45])
    label = int(build.user.clusters_of(member))
    same_cluster = known_items[item_labels == label]
    other_cluster = known_items[item_labels != label][:2]
    assert same_cluster.numel() >= 3
    neighbours = torch.cat([same_cluster[:3], other_cluster])
    new_user = 999_999
    row = build.user.assign(new_user, neighbours, build.item)
    assert row == int(build.user.transform(member))
    assert int(build.user.transform(torch.tensor([new_user]))) == row
    assert build.user.assign(new_user, other_cluster, build.item) == row  # a known id keeps its row
    assert build.user.assign(123, torch.tensor([7, 8]), build.item) == -1  # unknown neighbours
    assert build.user.num_known_ids == len(np.unique(users)) + 1
