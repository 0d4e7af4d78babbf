"""Fabric exchanges with rank-encoded data and closed-form answers, on any number of ranks."""

import numpy as np
import pytest
from meshtest import assert_neighbour_only, core_ids, fabric, layout_params

from meshrt.mesh import ring_next, ring_prev

pytestmark = [pytest.mark.mpi, pytest.mark.usefixtures("each_mover")]


def _global_ids(lay):
    return np.arange(lay.py * lay.px, dtype=np.float64).reshape(lay.py, lay.px)


def _mine(fab, glob):
    y0, x0 = fab.origin
    return glob[y0 : y0 + fab.by, x0 : x0 + fab.bx]


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("disp", [1, -1, 2, -3, 5])
@pytest.mark.parametrize("lay", layout_params())
def test_shift_takes_neighbour_id(axis, disp, lay):
    fab = fabric(lay)
    got = fab.shift(core_ids(fab, (2,)), axis, disp, fill=-1)
    g = _global_ids(lay)
    want = np.full_like(g, -1)
    n = g.shape[axis]
    src = np.arange(n) - disp
    ok = (src >= 0) & (src < n)
    if axis == 0:
        want[ok] = g[src[ok]]
    else:
        want[:, ok] = g[:, src[ok]]
    np.testing.assert_array_equal(got[..., 0], _mine(fab, want))
    np.testing.assert_array_equal(got[..., 1], _mine(fab, want))
    assert_neighbour_only(fab)


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("lay", layout_params())
def test_ring_shift_follows_interleaved_ring(axis, reverse, lay):
    fab = fabric(lay)
    n = lay.cores(axis)
    src = ring_next(n) if reverse else ring_prev(n)
    g = _global_ids(lay)
    want = g[src] if axis == 0 else g[:, src]
    block = core_ids(fab, (3, 2))
    got = block
    for _ in range(n):  # a full turn returns every tile home
        got = fab.ring_shift(got, axis, reverse)
        if _ == 0:
            np.testing.assert_array_equal(got[..., 0, 0], _mine(fab, want))
    np.testing.assert_array_equal(got, block)
    assert_neighbour_only(fab)


@pytest.mark.parametrize("lay", layout_params())
def test_halo_bytes_match_closed_form(lay):
    fab = fabric(lay)
    tile = (3,)
    fab.halo(core_ids(fab, tile), 1, 1, 2)
    # per relay round each rank sends one slab of `take` cores x by rows x tile to each side
    itemsize = 8
    sent = sum(r.nbytes for r in fab.trace if r.sent)
    want = 0
    rx = fab.coords[1]
    for width, to_hi in ((1, True), (2, False)):
        need, b = width, lay.bx
        while need > 0:
            take = min(need, b)
            has_peer = rx < lay.rx - 1 if to_hi else rx > 0
            if has_peer:
                want += take * lay.by * tile[0] * itemsize
            need -= take
    assert sent == want


def test_one_rank_needs_no_mpi():
    from meshrt.fabric import Fabric
    from meshrt.mesh import MeshLayout

    fab = Fabric(None, MeshLayout(4, 6), trace=True)
    out = fab.ring_shift(core_ids(fab), 1)
    assert out[0, 0] == ring_prev(6)[0]
    assert fab.trace == []
