"""The row cache: bounded in bytes, least recently used out first, invalidated by deltas."""

from __future__ import annotations

import numpy as np

from serving.cache import ENTRY_OVERHEAD_BYTES, RowCache

DIM = 4
ROW = DIM * 4 + ENTRY_OVERHEAD_BYTES


def rows(ids: np.ndarray) -> np.ndarray:
    return np.repeat(ids[:, None].astype(np.float32), DIM, axis=1)


def fill(cache: RowCache, table: str, ids: np.ndarray) -> None:
    assert cache.put(table, ids, rows(ids), np.ones(len(ids), bool), cache.epoch(table))


def test_hits_return_the_rows_put_and_count_towards_the_hit_rate():
    cache = RowCache(100 * ROW)
    fill(cache, "t", np.arange(10))
    values, found, hit = cache.get("t", np.array([3, 11, 9]), DIM)
    assert hit.tolist() == [True, False, True] and found.tolist() == [True, False, True]
    assert np.array_equal(values[[0, 2]], rows(np.array([3, 9])))
    assert cache.stats().hit_rate == 2 / 3


def test_the_budget_holds_and_the_least_recently_used_rows_go_first():
    cache = RowCache(100 * ROW, evict_fraction=0.2)
    fill(cache, "a", np.arange(60))
    cache.get("a", np.arange(10), DIM)  # rows 0..9 are now the most recently used
    fill(cache, "b", np.arange(60))
    stats = cache.stats()
    assert stats.bytes <= 100 * ROW and stats.evictions >= 20
    _, _, hit = cache.get("a", np.arange(60), DIM)
    assert hit[:10].all(), "recently used rows were evicted before older ones"
    assert not hit[10:30].any(), "the oldest rows should have gone first"
    assert cache.get("b", np.arange(60), DIM)[2].all(), "the newest table lost rows"


def test_invalidation_drops_rows_and_stale_fetches_are_not_cached():
    cache = RowCache(100 * ROW)
    fill(cache, "t", np.arange(5))
    epoch_before_fetch = cache.epoch("t")
    assert cache.invalidate("t", np.array([1, 2, 99])) == 2
    assert cache.get("t", np.array([1, 2, 3]), DIM)[2].tolist() == [False, False, True]
    # A fetch that read row 1 before the delta landed must not put the old value back.
    assert not cache.put(
        "t", np.array([1]), rows(np.array([1])), np.ones(1, bool), epoch_before_fetch
    )
    assert not cache.get("t", np.array([1]), DIM)[2][0]
    assert cache.stats().invalidations == 2


def test_absent_rows_are_cached_as_absent():
    cache = RowCache(100 * ROW)
    cache.put("t", np.array([7]), np.zeros((1, DIM), np.float32), np.zeros(1, bool), 0)
    _, found, hit = cache.get("t", np.array([7]), DIM)
    assert hit[0] and not found[0]


def test_clear_empties_every_table_and_moves_their_epochs():
    cache = RowCache(100 * ROW)
    fill(cache, "a", np.arange(3))
    fill(cache, "b", np.arange(3))
    epochs = cache.epoch("a"), cache.epoch("b")
    cache.clear()
    assert cache.stats().rows == 0 and cache.stats().bytes == 0
    assert (cache.epoch("a"), cache.epoch("b")) == (epochs[0] + 1, epochs[1] + 1)


def test_hot_ids_are_the_most_recently_used_first():
    cache = RowCache(100 * ROW)
    fill(cache, "t", np.arange(10))
    cache.get("t", np.array([8]), DIM)
    assert cache.hot_ids("t", 3)[0] == 8


def test_a_zero_budget_caches_nothing():
    cache = RowCache(0)
    assert not cache.put("t", np.arange(3), rows(np.arange(3)), np.ones(3, bool), 0)
    assert cache.stats().rows == 0
