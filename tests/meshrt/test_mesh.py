"""Pure mesh maths, no MPI."""

import numpy as np
import pytest

from meshrt.mesh import (
    MeshError,
    MeshLayout,
    default_rank_grid,
    from_tiles,
    pad_to,
    padded,
    parse_grid,
    ring_next,
    ring_order,
    ring_pos,
    ring_prev,
    skew_index,
    to_tiles,
)


def test_parse_grid():
    assert parse_grid("4x6") == (4, 6)
    assert parse_grid("8") == (8, 8)
    for bad in ("4x", "ax4", "0x4", "-1x2"):
        with pytest.raises(MeshError):
            parse_grid(bad)


def test_layout_ownership():
    lay = MeshLayout(6, 8, 3, 2)
    assert (lay.by, lay.bx) == (2, 4)
    assert lay.origin((2, 1)) == (4, 4)
    for py in range(6):
        for px in range(8):
            ry, rx = lay.owner(py, px)
            oy, ox = lay.origin((ry, rx))
            assert oy <= py < oy + lay.by and ox <= px < ox + lay.bx


def test_layout_errors_say_what_is_valid():
    with pytest.raises(MeshError, match=r"valid Ry: \[1, 2, 3, 6\]"):
        MeshLayout(6, 8, 4, 2)
    with pytest.raises(MeshError, match="positive"):
        MeshLayout(0, 4)
    with pytest.raises(MeshError, match="needs 4 ranks but 3"):
        MeshLayout.parse("4x4", "2x2", 3)
    with pytest.raises(MeshError, match="rank counts that fit"):
        default_rank_grid(5, 4, 4)


def test_default_rank_grid_is_squarest():
    assert default_rank_grid(4) == (2, 2)
    assert default_rank_grid(6) == (2, 3)
    assert default_rank_grid(6, 6, 4) == (3, 2)
    assert default_rank_grid(1) == (1, 1)


@pytest.mark.parametrize("shape,mesh", [((7, 5), (3, 2)), ((8, 8), (4, 4)), ((1, 9), (2, 5))])
def test_tiles_roundtrip_with_padding(shape, mesh):
    a = np.arange(np.prod(shape), dtype=float).reshape(shape) + 1
    t = to_tiles(a, mesh)
    assert t.shape[:2] == mesh
    np.testing.assert_array_equal(from_tiles(t, shape), a)
    # padding is zero and lives at the high end only
    full = from_tiles(t)
    assert full.sum() == a.sum()
    tm, tn = t.shape[2:]
    np.testing.assert_array_equal(t[1, 0], full[tm : 2 * tm, :tn])


def test_pad_helpers():
    assert padded(10, 4) == 12
    assert padded(10, 4, multiple=2) == 16
    assert pad_to(np.ones((2, 3)), (3, 3)).sum() == 6


@pytest.mark.parametrize("n", list(range(1, 16)) + [64, 101])
def test_interleaved_ring(n):
    order, pos = ring_order(n), ring_pos(n)
    assert sorted(order.tolist()) == list(range(n))
    np.testing.assert_array_equal(order[pos], np.arange(n))
    # every ring edge, including the closing one, is at most two physical hops
    edges = np.abs(order - np.roll(order, -1))
    assert edges.max() <= 2 if n > 1 else True
    nxt, prv = ring_next(n), ring_prev(n)
    np.testing.assert_array_equal(prv[nxt], np.arange(n))


def test_ring_matches_paper_example():
    # 5 cores: 0 -> 2 -> 4 -> 3 -> 1 -> 0; physical core 2 sends to 4 and receives from 0
    assert ring_order(5).tolist() == [0, 2, 4, 3, 1]
    assert ring_next(5)[2] == 4 and ring_prev(5)[2] == 0


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 8])
def test_skew_index_is_latin_square(n):
    ind = skew_index(n)
    assert ind[0].tolist() == list(range(n)) or n == 1
    for i in range(n):
        assert sorted(ind[i].tolist()) == list(range(n))
        assert sorted(ind[:, i].tolist()) == list(range(n))
