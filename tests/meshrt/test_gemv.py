"""MeshGEMV and its allreduce baselines against numpy, on any number of ranks."""

import numpy as np
import pytest
from meshtest import assert_neighbour_only, fabric, layout_params, world

from meshrt import hostio
from meshrt.collectives import AllreduceSpec
from meshrt.mesh import MeshLayout
from meshrt.ops import gemv as G

pytestmark = pytest.mark.mpi


def _run(fab, x, w, input_axis, **kw):
    lay = fab.layout
    mesh = (lay.py, lay.px)
    wb = hostio.local_block(fab, G.weight_tiles(w, mesh, input_axis))
    xb = hostio.local_block(fab, G.vector_tiles(x, mesh, input_axis))
    yb = G.meshgemv(fab, xb, wb, input_axis, **kw)
    out_axis = "x" if input_axis == "y" else "y"
    tiles = hostio.gather(fab, yb, to_all=True)
    return G.vector_from_tiles(tiles, w.shape[1], out_axis), yb


@pytest.mark.parametrize("input_axis", ["y", "x"])
@pytest.mark.parametrize(
    "algo,kw",
    [
        ("ktree", {}),
        ("ktree", {"groups": 2}),
        ("ktree", {"levels": 3}),
        ("pipeline", {}),
        ("ring", {}),
    ],
)
@pytest.mark.parametrize("lay", layout_params())
def test_meshgemv_matches_numpy(input_axis, algo, kw, lay):
    rng = np.random.default_rng(7)
    for m, n in ((37, 29), (12, 48)):
        x = rng.standard_normal(m).astype(np.float32)
        w = rng.standard_normal((m, n)).astype(np.float32)
        fab = fabric(lay)
        if kw.get("groups", 0) > lay.cores(0 if input_axis == "y" else 1):
            continue
        y, yb = _run(fab, x, w, input_axis, spec=AllreduceSpec(algo, **kw))
        np.testing.assert_allclose(y, x @ w, rtol=1e-5, atol=1e-4)
        assert_neighbour_only(fab)
        # output replicated along the other axis: every replica equal
        axis = 0 if input_axis == "y" else 1
        np.testing.assert_array_equal(yb, np.broadcast_to(yb.take([0], axis=axis), yb.shape))


@pytest.mark.parametrize("lay", layout_params())
def test_meshgemv_batched_and_chained_alternation(lay):
    rng = np.random.default_rng(3)
    fab = fabric(lay)
    mesh = (lay.py, lay.px)
    x = rng.standard_normal((2, 23)).astype(np.float32)
    w1 = rng.standard_normal((23, 31)).astype(np.float32)
    w2 = rng.standard_normal((31, 17)).astype(np.float32)
    xb = hostio.local_block(fab, G.vector_tiles(x, mesh, "y"))
    h = G.meshgemv(fab, xb, hostio.local_block(fab, G.weight_tiles(w1, mesh, "y")), "y")
    y = G.meshgemv(fab, h, hostio.local_block(fab, G.weight_tiles(w2, mesh, "x")), "x")
    got = G.vector_from_tiles(hostio.gather(fab, y, to_all=True), 17, "y")
    np.testing.assert_allclose(got, x @ w1 @ w2, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("algo", ["ktree", "pipeline", "ring"])
@pytest.mark.parametrize("input_axis", ["y", "x"])
def test_ledger_equals_estimate(algo, input_axis):
    size = world().Get_size()
    lay = MeshLayout(
        6 * (size if size <= 2 else 1),
        6 * (1 if size <= 2 else size // 2),
        *((size, 1) if size <= 2 else (2, size // 2)),
    )
    fab = fabric(lay)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(40).astype(np.float32)
    w = rng.standard_normal((40, 50)).astype(np.float32)
    _run(fab, x, w, input_axis, spec=AllreduceSpec(algo))
    est = G.estimate_meshgemv(
        40, 50, (lay.py, lay.px), input_axis=input_axis, spec=AllreduceSpec(algo)
    )
    got = {k: v for k, v in fab.ledger.ops.items() if k.startswith("meshgemv")}
    assert got.keys() == est.ops.keys()
    for k in got:
        assert got[k] == est.ops[k], k
    assert fab.ledger.peak_memory == est.peak_memory
    assert fab.ledger.max_routes == est.max_routes


@pytest.mark.parametrize("input_axis", ["y", "x"])
@pytest.mark.parametrize("lay", layout_params())
def test_stream_layout_multiplies_lines_of_cores_in_one_pass(input_axis, lay):
    """Weights in stream_layout memory hold the same tiles, and their products per line of
    cores agree with the per-core ones (a tied LM head's transposed tiles: the same bits)."""
    rng = np.random.default_rng(11)
    fab = fabric(lay)
    mesh = (lay.py, lay.px)
    m, n = 24 * lay.py * lay.px, 20 * lay.py * lay.px  # tiles of >= 300 elements
    x = rng.standard_normal(m).astype(np.float32)
    w = rng.standard_normal((m, n)).astype(np.float32)
    wb = hostio.local_block(fab, G.weight_tiles(w, mesh, input_axis))
    sb = G.stream_layout(wb, input_axis)
    assert sb.shape == wb.shape and (not sb.flags.c_contiguous or min(sb.shape[:2]) == 1)
    np.testing.assert_array_equal(sb, wb)
    xb = hostio.local_block(fab, G.vector_tiles(x, mesh, input_axis))
    per_core = G._gemv_f32(xb, wb)
    line = G.local_gemv(xb, sb, input_axis)
    np.testing.assert_allclose(line, per_core, rtol=1e-5, atol=1e-5)
    y = G.meshgemv(fab, xb, sb, input_axis)
    np.testing.assert_allclose(y, G.meshgemv(fab, xb, wb, input_axis), rtol=1e-5, atol=1e-4)
    if input_axis == "y":  # tiles stored transposed (tied LM head): the same bits per line
        tb = np.swapaxes(np.ascontiguousarray(np.swapaxes(wb, 2, 3)), 2, 3)
        np.testing.assert_array_equal(G.local_gemv(xb, tb, "y"), G._gemv_f32(xb, tb))


@pytest.mark.parametrize("input_axis", ["y", "x"])
@pytest.mark.parametrize("lay", layout_params())
def test_stream_layout_with_several_vectors(input_axis, lay):
    """B right-hand vectors through weights in stream_layout memory (and transposed tiles): one
    product per line of cores for all of them, each vector's result as if it ran alone; the
    K-tree carries B words per core."""
    rng = np.random.default_rng(12)
    fab = fabric(lay)
    mesh = (lay.py, lay.px)
    m, n, b = 24 * lay.py * lay.px, 20 * lay.py * lay.px, 5
    x = rng.standard_normal((b, m)).astype(np.float32)
    w = rng.standard_normal((m, n)).astype(np.float32)
    wb = hostio.local_block(fab, G.weight_tiles(w, mesh, input_axis))
    sb = G.stream_layout(wb, input_axis)
    xb = hostio.local_block(fab, G.vector_tiles(x, mesh, input_axis))  # [by, bx, B, seg]
    got = G.local_gemv(xb, sb, input_axis)
    for i in range(b):
        one = G.local_gemv(np.ascontiguousarray(xb[:, :, i]), sb, input_axis)
        np.testing.assert_allclose(got[:, :, i], one, rtol=1e-5, atol=1e-4)
    if input_axis == "y":
        tb = np.swapaxes(np.ascontiguousarray(np.swapaxes(wb, 2, 3)), 2, 3)
        np.testing.assert_allclose(G.local_gemv(xb, tb, "y"), got, rtol=1e-5, atol=1e-4)
    fab.ledger.reset()
    y, _ = _run(fab, x, w, input_axis)
    np.testing.assert_allclose(y, x @ w, rtol=1e-4, atol=1e-3)
    est = G.estimate_meshgemv(m, n, mesh, input_axis=input_axis, batch=b)
    assert fab.ledger.ops == est.ops
