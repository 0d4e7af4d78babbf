"""Grouped dist-GEMM-T and grouped MeshGEMM against numpy, on any number of ranks."""

import numpy as np
import pytest
from meshtest import assert_neighbour_only, fabric, layout_params, layouts, rank_grids, world

from meshrt.fabric import Fabric
from meshrt.mesh import MeshError, MeshLayout
from meshrt.ops import grouped as GR

pytestmark = [pytest.mark.mpi, pytest.mark.usefixtures("each_mover")]


def _meshes(size):
    """Square and non-square meshes with one or several cores per rank, and a 4x6 mesh whose
    lcm partition puts several logical cores on every virtual core."""
    out = layouts(size, blocks=((1, 1), (2, 3), (3, 2)))
    out += [MeshLayout(4, 6, ry, rx) for ry, rx in rank_grids(size) if 4 % ry == 0 and 6 % rx == 0][
        :1
    ]
    return out


def _want_t(a, b, labels, groups):
    return np.stack([a[:, labels == g] @ b[:, labels == g].T for g in range(groups)], axis=-1)


def _want(a, b, labels):
    out = np.zeros((a.shape[0], b.shape[1]), np.float32)
    for f, g in enumerate(labels):
        if g >= 0:
            out[:, f] = a[:, :, g] @ b[:, f]
    return out


def test_grouped_gemm_t_matches_numpy():
    rng = np.random.default_rng(0)
    for m, n, d, groups in ((13, 11, 17, 3), (29, 7, 10, 1), (5, 40, 24, 4)):
        a = rng.standard_normal((m, d)).astype(np.float32)
        b = rng.standard_normal((n, d)).astype(np.float32)
        labels = rng.integers(-1, groups, d)  # -1: features in no group
        want = _want_t(a, b, labels, groups)
        for lay in _meshes(world().Get_size()):
            fab = fabric(lay)
            got = GR.matmul_t_grouped(fab, a, b, labels, groups, to_all=True)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4, err_msg=str(lay))
            assert_neighbour_only(fab)


@pytest.mark.parametrize("preskewed", [False, True])
def test_grouped_meshgemm_matches_numpy(preskewed):
    rng = np.random.default_rng(1)
    for m, k, n, groups in ((13, 17, 11, 3), (6, 25, 9, 2), (31, 4, 14, 1)):
        a = rng.standard_normal((m, k, groups)).astype(np.float32)
        b = rng.standard_normal((k, n)).astype(np.float32)
        labels = rng.integers(-1, groups, n)
        want = _want(a, b, labels)
        for lay in _meshes(world().Get_size()):
            fab = fabric(lay)
            got = GR.matmul_grouped(fab, a, b, labels, b_preskewed=preskewed, to_all=True)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4, err_msg=str(lay))
            assert_neighbour_only(fab)


def test_one_group_is_the_ungrouped_product():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((9, 14)).astype(np.float32)
    b = rng.standard_normal((12, 14)).astype(np.float32)
    ry, rx = rank_grids(world().Get_size())[-1]
    fab = fabric(MeshLayout(2 * ry, 3 * rx, ry, rx))
    got = GR.matmul_t_grouped(fab, a, b, np.zeros(14, int), 1, to_all=True)
    np.testing.assert_allclose(got[..., 0], a @ b.T, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("lay", layout_params(blocks=((2, 2), (2, 3))))
def test_ledger_equals_estimate(lay):
    rng = np.random.default_rng(3)
    m, n, d, groups = 21, 26, 17, 3
    mesh = (lay.py, lay.px)
    fab = fabric(lay)
    GR.matmul_t_grouped(
        fab,
        rng.standard_normal((m, d)),
        rng.standard_normal((n, d)),
        rng.integers(-1, groups, d),
        groups,
    )
    est = GR.estimate_grouped_gemm_t(m, n, d, groups, mesh)
    assert fab.ledger.ops == est.ops
    assert fab.ledger.peak_memory == est.peak_memory
    assert fab.ledger.max_routes == est.max_routes
    for preskewed in (False, True):
        fab = fabric(lay)
        GR.matmul_grouped(
            fab,
            rng.standard_normal((m, d, groups)),
            rng.standard_normal((d, n)),
            rng.integers(-1, groups, n),
            b_preskewed=preskewed,
        )
        est = GR.estimate_grouped_meshgemm(m, d, n, groups, mesh, b_preskewed=preskewed)
        assert fab.ledger.ops == est.ops
        assert fab.ledger.peak_memory == est.peak_memory
        assert fab.ledger.max_routes == est.max_routes


def test_grouping_scales_words_not_macs():
    """Group partials make the dist-GEMM-T reduces G times longer; MACs stay the same."""
    one = GR.estimate_grouped_gemm_t(64, 64, 48, 1, (4, 4))
    four = GR.estimate_grouped_gemm_t(64, 64, 48, 4, (4, 4))
    assert four.ops["grouped_gemm_t/step"] == one.ops["grouped_gemm_t/step"]
    assert four.ops["grouped_gemm_t/reduce"].words == 4 * one.ops["grouped_gemm_t/reduce"].words
    g1 = GR.estimate_grouped_meshgemm(64, 48, 64, 1, (4, 4))
    g4 = GR.estimate_grouped_meshgemm(64, 48, 64, 4, (4, 4))
    assert g4.ops["grouped_meshgemm/step"].macs == g1.ops["grouped_meshgemm/step"].macs
    assert g4.ops["grouped_meshgemm/step"].words == 4 * g1.ops["grouped_meshgemm/step"].words


def test_bad_labels_give_a_clear_error():
    fab = Fabric(None, MeshLayout(2, 2))
    a = np.zeros((2, 2, 3, 4), np.float32)
    with pytest.raises(MeshError, match="labels"):
        GR.grouped_gemm_t(fab, a, a, np.zeros((2, 2, 3, 2), np.float32))
    with pytest.raises(ValueError, match="n_groups"):
        GR.label_tiles([0, 5], 2, (2, 2))
