"""Re-distributing ordered items along rank lines, with closed-form answers."""

import numpy as np
import pytest
from meshtest import assert_neighbour_only, fabric, layout_params

from meshrt.relayout import (
    bounds_from_counts,
    fetch_cost,
    fetch_rows,
    move_cost,
    rank_bounds,
    rebalance,
)

pytestmark = pytest.mark.mpi


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("lay", layout_params())
def test_rebalance_moves_ranges_in_order(axis, lay):
    rng = np.random.default_rng(5)
    nr = lay.ranks(axis)
    for _trial in range(4):
        total = int(rng.integers(0, 40))
        # the same random cuts on every rank (same seed sequence)
        cuts_src = np.sort(rng.integers(0, total + 1, nr - 1))
        cuts_dst = np.sort(rng.integers(0, total + 1, nr - 1))
        src = np.concatenate([[0], cuts_src, [total]])
        dst = np.concatenate([[0], cuts_dst, [total]])
        fab = fabric(lay)
        r = fab.coords[axis]
        other = fab.coords[1 - axis]
        items = np.arange(src[r], src[r + 1], dtype=np.float64)
        data = np.stack([items, items * 0 + other], axis=1)  # (items, 2): id and line tag
        got = rebalance(fab, data, axis, 0, src, dst)
        want = np.arange(dst[r], dst[r + 1], dtype=np.float64)
        np.testing.assert_array_equal(got[:, 0], want)
        np.testing.assert_array_equal(got[:, 1], np.full(want.shape, other))
        assert_neighbour_only(fab)


def test_move_cost_closed_form():
    # 4 cores: [3, 1, 0, 0] -> [1, 1, 1, 1]: item 1 goes 0->1 (1 hop), 2 goes 0->2, 3 goes 1->3
    c = move_cost([3, 1, 0, 0], [1, 1, 1, 1], words_per_item=5)
    assert c.hops == 2
    assert c.words == 2 * 5  # two items cross the boundary between cores 0 and 1
    assert move_cost([2, 2], [2, 2], 1).hops == 0
    np.testing.assert_array_equal(bounds_from_counts([2, 0, 3]), [0, 2, 2, 5])
    np.testing.assert_array_equal(rank_bounds([1, 2, 3, 4], 2), [0, 3, 10])


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("lay", layout_params())
def test_fetch_rows_delivers_items_anywhere_on_the_line(axis, lay):
    rng = np.random.default_rng(7)
    fab = fabric(lay)
    n, rows, slots = lay.cores(axis), 5, 4
    tiles = np.arange(lay.py * lay.px * rows * 2, dtype=np.float64).reshape(lay.py, lay.px, rows, 2)
    y0, x0 = fab.origin
    mine = tiles[y0 : y0 + lay.by, x0 : x0 + lay.bx]
    where = rng.permutation(n * slots)[: min(11, n * slots)]  # distinct target slots
    dst_core, dst_slot = where // slots, where % slots
    src_core = rng.integers(0, n, where.size)
    src_slot = rng.integers(0, rows, where.size)
    got = fetch_rows(fab, mine, axis, src_core, src_slot, dst_core, dst_slot, slots)
    want = np.zeros((lay.py, lay.px, slots, 2))
    for s, t, d, e in zip(src_core, src_slot, dst_core, dst_slot):
        if axis == 0:
            want[d, :, e] = tiles[s, :, t]
        else:
            want[:, d, e] = tiles[:, s, t]
    np.testing.assert_array_equal(got, want[y0 : y0 + lay.by, x0 : x0 + lay.bx])
    assert_neighbour_only(fab)


def test_fetch_cost_closed_form():
    # items 0->3 and 1->3 share the link between cores 1 and 2 (and 2, 3); 3->0 goes down
    c = fetch_cost([0, 1, 3], [3, 3, 0], 4, words_per_item=2)
    assert c.hops == 3 and c.words == 2 * 2
    assert fetch_cost([1, 2], [1, 2], 4, 1).words == 0
