"""Aggregated emulation of the GEMM kernels: the exact schedule's messages, ledger and results.

In aggregated emulation MeshGEMM, Cannon and the grouped kernels move tiles by identity
(:class:`meshrt.movers.tracked.TrackedLines`) and compute each rank's products as whole GEMMs. The
neighbour messages (peer, size, direction, name) must be those of the exact schedule, the
ledger identical, and the results equal to numpy's up to float32 summation order.
"""

from collections import Counter

import numpy as np
import pytest
from meshtest import assert_neighbour_only, fabric, rank_grids, world

from meshrt.hostio import local_block
from meshrt.mesh import MeshLayout
from meshrt.movers.tracked import TrackedLines
from meshrt.ops._lines import line_of
from meshrt.ops._tiles import natural_tiles
from meshrt.ops.gemm import cannon, matmul, prepare_a, prepare_b
from meshrt.ops.grouped import (
    grouped_a_tiles,
    grouped_gemm_t,
    grouped_meshgemm,
    label_tiles,
    matmul_grouped,
    matmul_t_grouped,
)
from meshrt.precision import to_words

pytestmark = pytest.mark.mpi

LABELS = np.array([0] * 5 + [1] * 6 + [2] * 3)  # 14 features in 3 groups


def meshes(size: int):
    """Square and non-square meshes on every rank grid of ``size`` ranks."""
    for ry, rx in rank_grids(size):
        for by, bx in ((2, 2), (1, 3), (3, 2)):
            yield MeshLayout(ry * by, rx * bx, ry, rx)


def messages(fab) -> Counter:
    return Counter((t.op, t.peer, t.nbytes, t.sent) for t in fab.trace)


def run_both(lay, kernel):
    out = {}
    for mover in ("exact", "aggregated"):
        fab = fabric(lay, mover=mover)
        out[mover] = (kernel(fab), messages(fab), fab.ledger.summary(), fab.ledger.cycles)
        assert_neighbour_only(fab)
    (r0, m0, s0, c0), (r1, m1, s1, c1) = out["exact"], out["aggregated"]
    assert m0 == m1
    assert s0 == s1 and c0 == c1
    return r0, r1


@pytest.mark.parametrize(
    "seed, m, k, n, tol",
    [
        (1, 13, 17, 11, 1e-5),
        # K segments long enough for the batched product of B where it is held (a rank-local
        # column of cores) or the whole-GEMM product (columns across ranks)
        (4, 9, 300, 21, 1e-4),
    ],
)
def test_meshgemm_aggregated_matches_exact(seed, m, k, n, tol):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((k, n)).astype(np.float32)
    for lay in meshes(world().Get_size()):
        for preskewed in (True, False):
            r0, r1 = run_both(
                lay, lambda f, pre=preskewed: matmul(f, a, b, b_preskewed=pre, to_all=True)
            )
            np.testing.assert_allclose(r1, a @ b, rtol=tol, atol=tol)
            np.testing.assert_allclose(r1, r0, rtol=tol, atol=tol)


def test_cannon_bfloat16_words_aggregated_matches_exact():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((10, 12)).astype(np.float32)
    b = rng.standard_normal((12, 8)).astype(np.float32)
    for lay in meshes(world().Get_size()):

        def kernel(fab, lay=lay):
            mesh = (lay.py, lay.px)
            ta = prepare_a(a, mesh)
            tb = to_words(prepare_b(b, mesh, "cannon"), "bfloat16")  # uint16 words
            sl = (
                slice(fab.origin[0], fab.origin[0] + lay.by),
                slice(fab.origin[1], fab.origin[1] + lay.bx),
            )
            return cannon(fab, ta[sl], tb[sl])

        r0, r1 = run_both(lay, kernel)
        np.testing.assert_allclose(r1, r0, rtol=1e-5, atol=1e-5)


def test_grouped_kernels_aggregated_match_exact():
    rng = np.random.default_rng(3)
    q = rng.standard_normal((9, 14)).astype(np.float32)
    k = rng.standard_normal((10, 14)).astype(np.float32)
    p = rng.standard_normal((9, 10, 3)).astype(np.float32)
    v = rng.standard_normal((10, 14)).astype(np.float32)
    want_t = np.stack([q[:, LABELS == g] @ k[:, LABELS == g].T for g in range(3)], axis=-1)
    want_pv = np.stack([p[:, :, LABELS[f]] @ v[:, f] for f in range(14)], axis=1)
    for lay in meshes(world().Get_size()):
        r0, r1 = run_both(lay, lambda f: matmul_t_grouped(f, q, k, LABELS, 3, to_all=True))
        np.testing.assert_allclose(r1, want_t, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(r1, r0, rtol=1e-5, atol=1e-5)
        r0, r1 = run_both(lay, lambda f: matmul_grouped(f, p, v, LABELS, to_all=True))
        np.testing.assert_allclose(r1, want_pv, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(r1, r0, rtol=1e-5, atol=1e-5)


def test_tracked_tiles_cannot_leave_a_rank_they_never_reached():
    lay = MeshLayout(2, 2 * world().Get_size(), 1, world().Get_size())
    fab = fabric(lay, mover="aggregated")
    line = line_of(fab, 1)
    block = np.zeros((lay.by, lay.bx, 1, 1), np.float32)
    tracked = TrackedLines(fab, block, 1, line, np.broadcast_to(np.arange(line.n), (2, line.n)))
    if fab.nranks == 1:
        assert tracked.complete() is tracked.store
    else:
        with pytest.raises(RuntimeError, match="never reached"):
            tracked.complete()


def test_aggregated_meshgemm_with_one_message_in_flight(monkeypatch):
    """With no room for buffers in flight, every posted send and receive completes before the
    next one: the same messages and results (the bounded-memory path of paper-size runs)."""
    monkeypatch.setattr(TrackedLines, "PENDING_BYTES", 1)
    rng = np.random.default_rng(5)
    a = rng.standard_normal((7, 19)).astype(np.float32)
    b = rng.standard_normal((19, 5)).astype(np.float32)
    for lay in meshes(world().Get_size()):
        r0, r1 = run_both(lay, lambda f: matmul(f, a, b, b_preskewed=False, to_all=True))
        np.testing.assert_allclose(r1, a @ b, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(r1, r0, rtol=1e-5, atol=1e-5)


def test_grouped_kernels_with_labels_that_differ_by_row_of_cores():
    """Labels are per core: where a row of cores labels its features otherwise than the
    others, the aggregated mover forms that row's products with its own labels."""
    rng = np.random.default_rng(6)
    q = rng.standard_normal((9, 14)).astype(np.float32)
    k = rng.standard_normal((10, 14)).astype(np.float32)
    p = rng.standard_normal((9, 10, 3)).astype(np.float32)
    v = rng.standard_normal((10, 14)).astype(np.float32)
    for lay in meshes(world().Get_size()):
        mesh = (lay.py, lay.px)
        labels = np.stack([label_tiles(np.roll(LABELS, 4 * y), 3, mesh)[y] for y in range(lay.py)])
        assert not (labels == labels[:1]).all() or lay.py == 1
        qt, kt, pt = natural_tiles(q, mesh), natural_tiles(k, mesh), grouped_a_tiles(p, mesh)
        vt = prepare_b(v, mesh, "natural")

        def scores(fab, tiles=(qt, kt, labels)):
            return grouped_gemm_t(fab, *(local_block(fab, t) for t in tiles))

        def weighted(fab, tiles=(pt, vt, labels)):
            return grouped_meshgemm(fab, *(local_block(fab, t) for t in tiles))

        for kernel in (scores, weighted):
            r0, r1 = run_both(lay, kernel)
            np.testing.assert_allclose(r1, r0, rtol=1e-5, atol=1e-5)
