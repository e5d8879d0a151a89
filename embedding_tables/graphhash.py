"""GraphHash: ids share rows by community of the user-item interaction graph.

Wu et al., "GraphHash: Graph Clustering Enables Parameter Efficiency in Recommender Systems"
(WWW 2025; snap-research/GraphHash). The bipartite user-item graph of the training interactions
is clustered by modularity (scikit-network's Louvain on the biadjacency matrix, as the authors
do); every id seen at build time reads the row of its cluster, so ids that interact with the same
things share parameters instead of colliding at random. The Louvain resolution is searched so the
number of clusters on each side fits that side's row budget.

Each side's table is [cluster rows | hash rows]. Ids unseen at build time hash into the hash rows
with the package's `hashing.bucket`, so serving recomputes their rows from raw ids. The `double`
variant (the paper's DoubleGraphHash) also gives every id a second, hashed row in the hash region;
the two rows are summed. Whatever the clustering leaves of the budget goes to the hash region, so
a side's table is always exactly its budget.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy import sparse
from sknetwork.clustering import Louvain, get_modularity
from torch import nn

from embedding_tables.errors import BudgetError, ConfigError, EmbeddingTableError, IdError
from embedding_tables.hashing import bucket
from embedding_tables.idmap import IdSlotMap, check_ids

FORMAT = "embtab.graphhash"
VERSION = 1
VARIANTS = ("single", "double")
SINGLE_HASH_SHARE = 0.05  # single: the share of a budget kept for ids unseen at build time
MIN_RESOLUTION = 1e-4
MAX_RESOLUTION = 1e4


class EmptyGraphError(EmbeddingTableError):
    """An interaction graph with no edges: nothing to cluster."""


class MappingFormatError(EmbeddingTableError):
    """Saved GraphHash tensors or metadata that this build cannot read."""


class GraphHashMapping(nn.Module):
    """One feature's id -> physical row map: cluster rows for known ids, hash rows for the rest.

    An nn.Module so that it is saved and loaded with the model's state_dict (versioned tensors);
    `to_tensors` / `from_tensors` give the same content as tensors plus JSON-able metadata.
    """

    def __init__(
        self,
        feature: str,
        ids: torch.Tensor,
        rows: torch.Tensor,
        row_cluster: torch.Tensor,
        num_hash_rows: int,
        *,
        variant: str = "single",
        seed: int = 0,
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ConfigError(
                f"feature {feature!r}: unknown graphhash variant {variant!r}; accepted: "
                f"{', '.join(VARIANTS)}"
            )
        if num_hash_rows < 1:
            raise BudgetError(
                f"feature {feature!r}: GraphHash needs at least 1 hash row for unseen ids, "
                f"got {num_hash_rows}"
            )
        self.feature = feature
        self.variant = variant
        self.seed = seed
        self._set(ids, rows, row_cluster, num_hash_rows)

    @classmethod
    def empty(cls, feature: str, *, variant: str = "single", seed: int = 0) -> GraphHashMapping:
        """A placeholder (every id hashed into one row) for `load_state_dict` to fill."""
        none = torch.empty(0, dtype=torch.int64)
        return cls(feature, none, none, none, 1, variant=variant, seed=seed)

    @property
    def num_cluster_rows(self) -> int:
        return self._row_cluster.numel()

    @property
    def num_hash_rows(self) -> int:
        return self._num_hash_rows

    @property
    def num_rows(self) -> int:
        """Rows of this feature's table: cluster rows plus hash rows."""
        return self.num_cluster_rows + self._num_hash_rows

    @property
    def rows_per_id(self) -> int:
        """1 for single; 2 for double (cluster row + hashed row, to be summed)."""
        return 2 if self.variant == "double" else 1

    @property
    def num_known_ids(self) -> int:
        return len(self._map)

    def transform(self, ids: torch.Tensor) -> torch.Tensor:
        """Physical row of each id: its cluster's row if known, else a hash row."""
        ids = check_ids(ids, f"feature {self.feature!r}: ids")
        slots = self._map.lookup(ids)
        fallback = self.num_cluster_rows + bucket(ids, self.seed, self._num_hash_rows)
        if len(self._map) == 0:
            return fallback
        return torch.where(slots >= 0, self._slot_row[slots.clamp(min=0)], fallback)

    def transform_hashed(self, ids: torch.Tensor) -> torch.Tensor:
        """The double variant's second row: a hash row for every id, summed with `transform`."""
        if self.variant != "double":
            raise ConfigError(
                f"feature {self.feature!r}: transform_hashed is for the double variant; this "
                f"mapping is {self.variant!r}"
            )
        ids = check_ids(ids, f"feature {self.feature!r}: ids")
        return self.num_cluster_rows + bucket(ids, self.seed + 1, self._num_hash_rows)

    def transform_all(self, ids: torch.Tensor) -> torch.Tensor:
        """[N, rows_per_id] rows to sum per id (a single column for the single variant)."""
        if self.variant == "double":
            return torch.stack([self.transform(ids), self.transform_hashed(ids)], dim=1)
        return self.transform(ids).unsqueeze(1)

    def clusters_of(self, ids: torch.Tensor) -> torch.Tensor:
        """Graph cluster label of each id (shared by both sides of the graph); -1 if unknown."""
        ids = check_ids(ids, f"feature {self.feature!r}: ids")
        if len(self._map) == 0:
            return torch.full_like(ids, -1)
        slots = self._map.lookup(ids)
        labels = self._row_cluster[self._slot_row[slots.clamp(min=0)]]
        return torch.where(slots >= 0, labels, -1)

    def coverage(self, ids: torch.Tensor) -> float:
        """Share of `ids` (e.g. a test split's) that read a cluster row rather than a hash row."""
        ids = check_ids(ids, f"feature {self.feature!r}: ids")
        if ids.numel() == 0:
            return 0.0
        return float((self._map.lookup(ids) >= 0).float().mean())

    def assign(
        self,
        new_id: int,
        neighbour_ids: torch.Tensor,
        neighbour_mapping: GraphHashMapping,
    ) -> int:
        """Streaming: give `new_id` the cluster most of its neighbours belong to; its row, or -1.

        `neighbour_ids` are the other side's ids it interacted with, looked up in
        `neighbour_mapping` (the other side's mapping from the same build). Ties go to the
        smaller cluster label. An id already known keeps its row; one whose neighbours are all
        unknown, or in clusters with no row on this side, stays on the hash fallback (-1).
        """
        new = check_ids(torch.tensor([new_id], dtype=torch.int64), f"feature {self.feature!r}")
        new = new.to(self.device)
        known = self._map.lookup(new)
        if int(known[0]) >= 0:
            return int(self._slot_row[known[0]])
        labels = neighbour_mapping.clusters_of(neighbour_ids.to(neighbour_mapping.device))
        labels = labels[labels >= 0].to(self.device)
        if labels.numel() == 0 or self.num_cluster_rows == 0:
            return -1
        candidate_rows = torch.searchsorted(self._row_cluster, labels).clamp(
            max=self.num_cluster_rows - 1
        )
        here = self._row_cluster[candidate_rows] == labels
        if not bool(here.any()):
            return -1
        rows, votes = torch.unique(candidate_rows[here], return_counts=True)
        winner = rows[torch.argmax(votes)]
        slot = self._map.insert_new(new)
        if self._map.slot_high_water > self._slot_row.numel():
            grown = torch.full(
                (max(self._map.slot_high_water, 2 * self._slot_row.numel()),),
                -1,
                dtype=torch.int64,
                device=self.device,
            )
            grown[: self._slot_row.numel()] = self._slot_row
            self._slot_row = grown
        self._slot_row[slot] = winner
        return int(winner)

    @property
    def device(self) -> torch.device:
        return self._row_cluster.device

    # -- serialisation -------------------------------------------------------------------------

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """(tensors, metadata) for safetensors: ids and their rows, cluster labels; versioned."""
        ids, slots = self._map.items()
        tensors = {
            "ids": ids.cpu(),
            "rows": self._slot_row[slots].cpu(),
            "row_cluster": self._row_cluster.cpu(),
        }
        metadata = {
            "format": FORMAT,
            "version": str(VERSION),
            "feature": self.feature,
            "variant": self.variant,
            "seed": str(self.seed),
            "num_cluster_rows": str(self.num_cluster_rows),
            "num_hash_rows": str(self._num_hash_rows),
        }
        return tensors, metadata

    @classmethod
    def from_tensors(
        cls, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
    ) -> GraphHashMapping:
        """Rebuild a mapping saved by `to_tensors`; MappingFormatError if it is not one."""
        if metadata.get("format") != FORMAT:
            raise MappingFormatError(
                f"not a GraphHash mapping: format {metadata.get('format')!r}, expected {FORMAT!r}"
            )
        if metadata.get("version") != str(VERSION):
            raise MappingFormatError(
                f"GraphHash mapping version {metadata.get('version')!r}; this build reads "
                f"version {VERSION}"
            )
        missing = [key for key in ("ids", "rows", "row_cluster") if key not in tensors]
        if missing:
            raise MappingFormatError(f"GraphHash mapping lacks tensors: {', '.join(missing)}")
        try:
            feature, variant = metadata["feature"], metadata["variant"]
            seed = int(metadata["seed"])
            num_cluster_rows = int(metadata["num_cluster_rows"])
            num_hash_rows = int(metadata["num_hash_rows"])
        except (KeyError, ValueError) as error:
            raise MappingFormatError(f"GraphHash metadata is unreadable: {error}") from error
        mapping = cls(
            feature,
            tensors["ids"],
            tensors["rows"],
            tensors["row_cluster"],
            num_hash_rows,
            variant=variant,
            seed=seed,
        )
        if mapping.num_cluster_rows != num_cluster_rows:
            raise MappingFormatError(
                f"GraphHash mapping says {num_cluster_rows} cluster rows but carries "
                f"{mapping.num_cluster_rows} cluster labels"
            )
        return mapping

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        tensors, _ = self.to_tensors()
        for name, tensor in tensors.items():
            destination[prefix + name] = tensor
        variant = VARIANTS.index(self.variant)
        destination[prefix + "meta"] = torch.tensor(
            [VERSION, variant, self.seed, self._num_hash_rows], dtype=torch.int64
        )

    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        expected = ("ids", "rows", "row_cluster", "meta")
        for key in state_dict:
            if key.startswith(prefix) and key[len(prefix) :] not in expected:
                unexpected_keys.append(key)
        absent = [prefix + name for name in expected if prefix + name not in state_dict]
        if absent:
            missing_keys.extend(absent)
            return
        version, variant, seed, num_hash_rows = state_dict[prefix + "meta"].tolist()
        if version != VERSION or not 0 <= variant < len(VARIANTS):
            raise MappingFormatError(
                f"feature {self.feature!r}: GraphHash state version {version} (variant code "
                f"{variant}); this build reads version {VERSION}"
            )
        device = self.device
        self.variant = VARIANTS[variant]
        self.seed = seed
        self._set(
            state_dict[prefix + "ids"].to(device),
            state_dict[prefix + "rows"].to(device),
            state_dict[prefix + "row_cluster"].to(device),
            num_hash_rows,
        )

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> nn.Module:
        """Follow the module's device (the mapping's tensors are integer, never cast)."""
        super()._apply(fn, recurse)
        device = fn(torch.empty(0)).device
        self._row_cluster = self._row_cluster.to(device)
        self._slot_row = self._slot_row.to(device)
        self._map.to(device)
        return self

    def extra_repr(self) -> str:
        return (
            f"feature={self.feature!r}, variant={self.variant!r}, known_ids={self.num_known_ids}, "
            f"cluster_rows={self.num_cluster_rows}, hash_rows={self._num_hash_rows}"
        )

    def _set(
        self,
        ids: torch.Tensor,
        rows: torch.Tensor,
        row_cluster: torch.Tensor,
        num_hash_rows: int,
    ) -> None:
        """Validate everything, then replace the mapping's content (nothing changes on error)."""
        device = row_cluster.device
        ids = check_ids(ids, f"feature {self.feature!r}: mapping ids").to(device)
        rows = rows.to(device=device, dtype=torch.int64).reshape(-1)
        row_cluster = row_cluster.to(dtype=torch.int64).reshape(-1)
        if rows.numel() != ids.numel():
            raise MappingFormatError(
                f"feature {self.feature!r}: {ids.numel()} ids but {rows.numel()} rows"
            )
        if num_hash_rows < 1:
            raise MappingFormatError(
                f"feature {self.feature!r}: num_hash_rows must be >= 1, got {num_hash_rows}"
            )
        num_cluster_rows = row_cluster.numel()
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= num_cluster_rows):
            raise MappingFormatError(
                f"feature {self.feature!r}: id rows must lie in [0, {num_cluster_rows})"
            )
        if num_cluster_rows > 1 and bool((row_cluster[1:] <= row_cluster[:-1]).any()):
            raise MappingFormatError(
                f"feature {self.feature!r}: cluster labels of the rows must be strictly increasing"
            )
        if torch.unique(ids).numel() != ids.numel():
            raise MappingFormatError(f"feature {self.feature!r}: mapping ids must be distinct")
        id_map = IdSlotMap(seed=self.seed, device=device)
        slots = id_map.insert_new(ids)
        slot_row = torch.empty_like(rows)
        slot_row[slots] = rows
        self._map = id_map
        self._slot_row = slot_row
        self._row_cluster = row_cluster
        self._num_hash_rows = int(num_hash_rows)


@dataclass(frozen=True)
class GraphHashReport:
    """What a build bought: cluster counts, clustering quality, and who is covered."""

    num_clusters: int  # clusters of the bipartite partition (users and items together)
    num_user_clusters: int
    num_item_clusters: int
    modularity: float  # Barber's bipartite modularity of the partition, at resolution 1
    resolution: float  # the Louvain resolution the budget search settled on
    user_coverage: float  # share of the user id space that reads a cluster row
    item_coverage: float
    user_rows: int  # rows of the user table (its budget)
    item_rows: int
    num_edges: int  # distinct (user, item) pairs in the graph
    louvain_runs: int

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


@dataclass(frozen=True)
class GraphHashBuild:
    user: GraphHashMapping
    item: GraphHashMapping
    report: GraphHashReport


def build_graphhash(
    user_ids: torch.Tensor | np.ndarray,
    item_ids: torch.Tensor | np.ndarray,
    budget_rows: int | tuple[int, int],
    seed: int = 0,
    *,
    variant: str = "single",
    hash_rows: int | tuple[int, int] | None = None,
    user_feature: str = "user_id",
    item_feature: str = "item_id",
    user_cardinality: int | None = None,
    item_cardinality: int | None = None,
    search_steps: int = 8,
) -> GraphHashBuild:
    """Cluster the user-item graph of `(user_ids[k], item_ids[k])` interactions into mappings.

    `budget_rows` is each side's table size in rows (one int for both, or (users, items)).
    `hash_rows` is the part of it reserved for hashing; by default 5% (at least 1) for `single`
    and half for `double`. The Louvain resolution is searched (geometric bracketing, then
    `search_steps` bisection steps) for the most clusters that fit both sides' cluster budgets.
    Coverage is the share of `user_cardinality` (default: the distinct users seen) with a
    cluster row. Deterministic for a seed.
    """
    if variant not in VARIANTS:
        raise ConfigError(f"unknown graphhash variant {variant!r}; accepted: {', '.join(VARIANTS)}")
    users = _as_ids(user_ids, user_feature)
    items = _as_ids(item_ids, item_feature)
    if users.size != items.size:
        raise IdError(
            f"{user_feature!r} has {users.size} ids and {item_feature!r} {items.size}; each "
            f"interaction needs one of each"
        )
    if users.size == 0:
        raise EmptyGraphError(
            f"the interaction graph of {user_feature!r} x {item_feature!r} has no edges; "
            f"GraphHash needs at least one ({user_feature}, {item_feature}) interaction"
        )
    user_budget, item_budget = _per_side(budget_rows, "budget_rows")
    user_hash_reserve, item_hash_reserve = (
        (None, None) if hash_rows is None else _per_side(hash_rows, "hash_rows")
    )
    unique_users, user_index = np.unique(users, return_inverse=True)
    unique_items, item_index = np.unique(items, return_inverse=True)
    biadjacency = sparse.csr_matrix(
        (np.ones(users.size, dtype=np.float64), (user_index, item_index)),
        shape=(unique_users.size, unique_items.size),
    )
    biadjacency.sum_duplicates()
    biadjacency.data[:] = 1.0  # one edge per (user, item) pair, however often they met

    user_cluster_budget = _cluster_budget(user_budget, variant, user_hash_reserve, user_feature)
    item_cluster_budget = _cluster_budget(item_budget, variant, item_hash_reserve, item_feature)

    runs: dict[float, tuple[np.ndarray, np.ndarray]] = {}

    def cluster(resolution: float) -> tuple[np.ndarray, np.ndarray]:
        if resolution not in runs:
            louvain = Louvain(resolution=resolution, random_state=seed)
            louvain.fit(biadjacency, force_bipartite=True)
            runs[resolution] = (louvain.labels_row_, louvain.labels_col_)
        return runs[resolution]

    def rows_used(resolution: float) -> int | None:
        """Cluster rows both sides use at this resolution; None if over either side's budget."""
        user_labels, item_labels = cluster(resolution)
        user_rows, item_rows = np.unique(user_labels).size, np.unique(item_labels).size
        if user_rows > user_cluster_budget or item_rows > item_cluster_budget:
            return None
        return user_rows + item_rows

    resolution = _search_resolution(rows_used, search_steps)
    if resolution is None:
        user_labels, item_labels = cluster(MIN_RESOLUTION)
        fewest_users, fewest_items = np.unique(user_labels).size, np.unique(item_labels).size
        raise BudgetError(
            "GraphHash budget too small: even the coarsest clustering of the graph (its "
            f"connected components) has {fewest_users} clusters of {user_feature!r} and "
            f"{fewest_items} of {item_feature!r}; the minimum budget is "
            f"{_minimum_budget(fewest_users, variant, user_hash_reserve)} rows for "
            f"{user_feature!r} and {_minimum_budget(fewest_items, variant, item_hash_reserve)} "
            f"for {item_feature!r} (got {user_budget} and {item_budget})"
        )
    user_labels, item_labels = cluster(resolution)
    user_mapping = _side_mapping(
        user_feature, unique_users, user_labels, user_budget, variant, seed
    )
    item_mapping = _side_mapping(
        item_feature, unique_items, item_labels, item_budget, variant, seed
    )
    report = GraphHashReport(
        num_clusters=int(np.unique(np.concatenate([user_labels, item_labels])).size),
        num_user_clusters=user_mapping.num_cluster_rows,
        num_item_clusters=item_mapping.num_cluster_rows,
        modularity=bipartite_modularity(biadjacency, user_labels, item_labels),
        resolution=resolution,
        user_coverage=unique_users.size / max(user_cardinality or unique_users.size, 1),
        item_coverage=unique_items.size / max(item_cardinality or unique_items.size, 1),
        user_rows=user_mapping.num_rows,
        item_rows=item_mapping.num_rows,
        num_edges=int(biadjacency.nnz),
        louvain_runs=len(runs),
    )
    return GraphHashBuild(user_mapping, item_mapping, report)


def bipartite_modularity(
    biadjacency: sparse.csr_matrix,
    user_labels: np.ndarray,
    item_labels: np.ndarray,
    resolution: float = 1.0,
) -> float:
    """Barber's modularity via scikit-network's `get_modularity`, bipartite even when square.

    scikit-network reads a square matrix as a (unipartite) adjacency; an extra empty column makes
    it unambiguous without changing the value (a node with no edges adds nothing).
    """
    if biadjacency.shape[0] == biadjacency.shape[1]:
        biadjacency = sparse.hstack(
            [biadjacency, sparse.csr_matrix((biadjacency.shape[0], 1))], format="csr"
        )
        item_labels = np.append(item_labels, -1)
    return float(get_modularity(biadjacency, user_labels, item_labels, resolution=resolution))


def mappings_to_tensors(
    mappings: Mapping[str, GraphHashMapping],
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Several features' mappings as one safetensors payload: `<feature>.<tensor>` keys."""
    tensors: dict[str, torch.Tensor] = {}
    metadata: dict[str, dict[str, str]] = {}
    for feature, mapping in mappings.items():
        feature_tensors, feature_metadata = mapping.to_tensors()
        tensors.update({f"{feature}.{name}": t for name, t in feature_tensors.items()})
        metadata[feature] = feature_metadata
    return tensors, {"format": FORMAT, "version": str(VERSION), "features": json.dumps(metadata)}


def mappings_from_tensors(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> dict[str, GraphHashMapping]:
    """Inverse of `mappings_to_tensors`."""
    if metadata.get("format") != FORMAT or "features" not in metadata:
        raise MappingFormatError(
            f"not a GraphHash payload: format {metadata.get('format')!r}, expected {FORMAT!r}"
        )
    if metadata.get("version") != str(VERSION):
        raise MappingFormatError(
            f"GraphHash payload version {metadata.get('version')!r}; this build reads {VERSION}"
        )
    mappings = {}
    for feature, feature_metadata in json.loads(metadata["features"]).items():
        prefix = f"{feature}."
        feature_tensors = {
            key[len(prefix) :]: tensor for key, tensor in tensors.items() if key.startswith(prefix)
        }
        mappings[feature] = GraphHashMapping.from_tensors(feature_tensors, feature_metadata)
    return mappings


def _side_mapping(
    feature: str,
    unique_ids: np.ndarray,
    labels: np.ndarray,
    budget: int,
    variant: str,
    seed: int,
) -> GraphHashMapping:
    """Rows in increasing cluster-label order (scikit-network sorts clusters by size)."""
    row_cluster, rows = np.unique(labels, return_inverse=True)
    return GraphHashMapping(
        feature,
        torch.from_numpy(unique_ids.astype(np.int64)),
        torch.from_numpy(rows.astype(np.int64)),
        torch.from_numpy(row_cluster.astype(np.int64)),
        budget - row_cluster.size,
        variant=variant,
        seed=seed,
    )


def _search_resolution(rows_used: Callable[[float], int | None], search_steps: int) -> float | None:
    """The resolution whose clustering uses the most cluster rows within budget.

    Bracket geometrically from 1, then bisect `search_steps` times on a log scale. Cluster counts
    grow with the resolution, if not strictly, so the best resolution evaluated is kept; among
    equally many rows the smallest resolution wins (coarser communities, higher modularity).
    None if not even MIN_RESOLUTION fits.
    """
    best: tuple[int, float] | None = None

    def fits(resolution: float) -> bool:
        nonlocal best
        used = rows_used(resolution)
        if used is None:
            return False
        if best is None or used > best[0] or (used == best[0] and resolution < best[1]):
            best = (used, resolution)
        return True

    resolution = 1.0
    if fits(resolution):
        low, high = resolution, None
        while high is None and resolution < MAX_RESOLUTION:
            resolution = min(resolution * 8, MAX_RESOLUTION)
            if fits(resolution):
                low = resolution
            else:
                high = resolution
    else:
        low, high = None, resolution
        while low is None and resolution > MIN_RESOLUTION:
            resolution = max(resolution / 8, MIN_RESOLUTION)
            if fits(resolution):
                low = resolution
            else:
                high = resolution
    if low is not None and high is not None:
        for _ in range(search_steps):
            middle = math.sqrt(low * high)
            if fits(middle):
                low = middle
            else:
                high = middle
    return None if best is None else best[1]


def _per_side(value: int | tuple[int, int], name: str) -> tuple[int, int]:
    if isinstance(value, tuple):
        if len(value) != 2:
            raise ConfigError(f"{name} must be an int or a (users, items) pair, got {value!r}")
        return int(value[0]), int(value[1])
    return int(value), int(value)


def _hash_rows(budget: int, variant: str, reserve: int | None) -> int:
    if reserve is not None:
        return reserve
    if variant == "double":
        return max(1, budget // 2)
    return max(1, int(budget * SINGLE_HASH_SHARE))


def _cluster_budget(budget: int, variant: str, reserve: int | None, feature: str) -> int:
    """Rows left for clusters; BudgetError (saying the minimum) if not even one is."""
    if reserve is not None and reserve < 1:
        raise BudgetError(f"{feature!r}: hash_rows must be >= 1, got {reserve}")
    clusters = budget - _hash_rows(budget, variant, reserve)
    if clusters < 1:
        raise BudgetError(
            f"{feature!r}: a GraphHash budget of {budget} rows leaves {clusters} for clusters; "
            f"the minimum is {_minimum_budget(1, variant, reserve)} rows (at least one cluster "
            f"row plus the hash rows for unseen ids)"
        )
    return clusters


def _minimum_budget(clusters: int, variant: str, reserve: int | None) -> int:
    """Smallest budget whose cluster part holds `clusters` rows (budget minus hash rows)."""
    low, high = clusters + 1, 2 * clusters + (reserve or 0) + 2
    while low < high:
        middle = (low + high) // 2
        if middle - _hash_rows(middle, variant, reserve) >= clusters:
            high = middle
        else:
            low = middle + 1
    return low


def _as_ids(ids: torch.Tensor | np.ndarray, feature: str) -> np.ndarray:
    array = ids.detach().cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
    if array.dtype.kind not in "iu":
        raise IdError(f"{feature!r}: interaction ids must be integers, got dtype {array.dtype}")
    return array.reshape(-1).astype(np.int64)
