"""GEMM kernels (MeshGEMM, Cannon, SUMMA, dist-GEMM-T) against numpy, on any number of ranks."""

import numpy as np
import pytest
from meshtest import (
    as_params,
    assert_neighbour_only,
    core_ids,
    fabric,
    layout_params,
    layouts,
    rank_grids,
    world,
)

from meshrt import hostio
from meshrt.fabric import Fabric
from meshrt.mesh import MeshError, MeshLayout, lcm, ring_next, ring_pos, ring_prev, skew_index
from meshrt.ops import estimate as E
from meshrt.ops import gemm as G
from meshrt.ops import grouped as GR
from meshrt.ops._lines import line_of, permute_line, ring_dest, shift_lines_back
from meshrt.ops._tiles import natural_tiles

pytestmark = [pytest.mark.mpi, pytest.mark.usefixtures("each_mover")]


def _meshes(size, extra=((4, 6), (3, 3), (6, 4))):
    """The standard test layouts plus a few named non-square meshes that this rank count tiles."""
    out = layouts(size)
    for ry, rx in rank_grids(size):
        for py, px in extra:
            if py % ry == 0 and px % rx == 0:
                out.append(MeshLayout(py, px, ry, rx))
    return out


def _few(size):
    """A square and a non-square layout with several cores per rank (for slower checks)."""
    ry, rx = rank_grids(size)[len(rank_grids(size)) // 2]
    return [MeshLayout(2 * ry, 2 * rx, ry, rx), MeshLayout(2 * ry, 3 * rx, ry, rx)]


def _matrices(m, k, n, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((m, k)).astype(dtype), rng.standard_normal((k, n)).astype(dtype))


# ----------------------------------------------------------------------------------------------
# Line movement
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("lay", layout_params())
def test_permute_line_is_the_fabric_ring_and_the_cyclic_shift(axis, lay):
    fab = fabric(lay)
    n = lay.cores(axis)
    line = line_of(fab, axis)
    block = core_ids(fab, (2, 3))
    for reverse in (False, True):
        want = fab.ring_shift(block, axis, reverse=reverse)
        got = permute_line(fab, block, axis, ring_dest(n, "interleaved", reverse), line)
        np.testing.assert_array_equal(got, want)
    # Cannon's cyclic shift by one: the wrap tile crosses the whole line
    got = permute_line(fab, block, axis, ring_dest(n, "linear"), line)
    ids = np.arange(lay.py * lay.px, dtype=np.float64).reshape(lay.py, lay.px)
    rolled = np.roll(ids, 1, axis=axis)
    y0, x0 = fab.origin
    np.testing.assert_array_equal(got[..., 0, 0], rolled[y0 : y0 + lay.by, x0 : x0 + lay.bx])
    assert_neighbour_only(fab)


@pytest.mark.parametrize("lay", layout_params())
def test_permute_line_on_a_refined_line_and_skew_back(lay):
    fab = fabric(lay)
    refine = 3
    line = line_of(fab, 1, refine)
    n = line.n
    rows = np.arange(lay.by)
    # logical tile (row r, logical column j) holds r * 1000 + j
    block = (fab.index(0)[:, None] * 1000 + np.arange(line.lo, line.hi)[None, :]).astype(float)
    dest = ring_dest(n, "interleaved")
    got = permute_line(fab, block, 1, dest, line)
    src = ring_prev(n)
    np.testing.assert_array_equal(got, fab.index(0)[:, None] * 1000 + src[line.lo : line.hi])
    # each row moves back by its own amount, the shorter way round
    amounts = (fab.index(0) * 5 + 1) % n
    got = shift_lines_back(fab, block, 1, line, amounts)
    pos = ring_pos(n)
    order = np.argsort(pos)
    cols = np.arange(line.lo, line.hi)
    for r in rows:
        want = order[(pos[cols] + amounts[r]) % n]
        np.testing.assert_array_equal(got[r], fab.index(0)[r] * 1000 + want)
    assert_neighbour_only(fab)


# ----------------------------------------------------------------------------------------------
# Correctness against numpy
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("algo", G.ALGOS)
def test_gemm_matches_numpy(algo):
    size = world().Get_size()
    a, b = _matrices(37, 29, 41)
    want = a @ b
    for i, lay in enumerate(_meshes(size)):
        fab = fabric(lay)
        got = G.matmul(fab, a, b, algo=algo, to_all=True)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4, err_msg=str(lay))
        assert_neighbour_only(fab)
        if i < 3:  # tall and wide operands
            for m, k, n in ((61, 5, 3), (2, 9, 70)):
                x, y = _matrices(m, k, n, seed=i)
                got = G.matmul(fab, x, y, algo=algo, to_all=True)
                np.testing.assert_allclose(got, x @ y, rtol=1e-5, atol=1e-4, err_msg=str(lay))


@pytest.mark.parametrize("algo", ["meshgemm", "cannon"])
@pytest.mark.parametrize("lay", as_params(_meshes(world().Get_size())[::2]))
def test_right_operand_skewed_on_the_mesh(algo, lay):
    a, b = _matrices(19, 23, 17, seed=1)
    fab = fabric(lay)
    got = G.matmul(fab, a, b, algo=algo, b_preskewed=False, to_all=True)
    np.testing.assert_allclose(got, a @ b, rtol=1e-5, atol=1e-4, err_msg=str(lay))
    assert_neighbour_only(fab)


@pytest.mark.parametrize("algo", G.ALGOS)
@pytest.mark.parametrize("lay", as_params(_few(world().Get_size())))
def test_float16_storage_accumulates_in_float32(algo, lay):
    a, b = _matrices(24, 40, 16, seed=2, dtype=np.float16)
    want = a.astype(np.float32) @ b.astype(np.float32)
    fab = fabric(lay)
    got = G.matmul(fab, a, b, algo=algo, dtype=np.float16, to_all=True)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_gemm_t_matches_numpy():
    size = world().Get_size()
    rng = np.random.default_rng(4)
    q = rng.standard_normal((37, 29)).astype(np.float32)
    k = rng.standard_normal((41, 29)).astype(np.float32)
    for i, lay in enumerate(_meshes(size)):
        fab = fabric(lay)
        got = GR.matmul_t(fab, q, k, to_all=True)
        np.testing.assert_allclose(got, q @ k.T, rtol=1e-5, atol=1e-4, err_msg=str(lay))
        assert_neighbour_only(fab)
        if i < 3:
            for m, n, d in ((50, 3, 4), (3, 44, 7)):
                x = rng.standard_normal((m, d)).astype(np.float32)
                y = rng.standard_normal((n, d)).astype(np.float32)
                got = GR.matmul_t(fab, x, y, to_all=True)
                np.testing.assert_allclose(got, x @ y.T, rtol=1e-5, atol=1e-4, err_msg=str(lay))


@pytest.mark.parametrize("lay", as_params(_few(world().Get_size())))
def test_gemm_chain_keeps_the_natural_layout(lay):
    """Scores feed S @ V directly: gemm_t's output is MeshGEMM's left operand, V skewed on mesh."""
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((20, 12)).astype(np.float32) for _ in range(3))
    fab = fabric(lay)
    mesh = (lay.py, lay.px)
    qt, kt = natural_tiles(q, mesh), natural_tiles(k, mesh)
    one_group = GR.label_tiles(np.zeros(12, int), 1, mesh)
    blocks = (hostio.local_block(fab, t) for t in (qt, kt, one_group))
    s = GR.grouped_gemm_t(fab, *blocks)[..., 0]
    vb = hostio.local_block(fab, G.prepare_b(v, mesh, "summa"))
    o = G.meshgemm(fab, s, vb, b_preskewed=False)
    got = hostio.gather_matrix(fab, o, (20, 12), to_all=True)
    np.testing.assert_allclose(got, q @ k.T @ v, rtol=1e-4, atol=1e-3)


def test_host_preskew_is_the_papers_index():
    b = np.arange(36.0).reshape(6, 6)
    tiles = G.prepare_b(b, (6, 6), "meshgemm")
    ind = skew_index(6)
    for i in range(6):
        for j in range(6):
            assert tiles[i, j, 0, 0] == b[ind[i, j], j]
    assert ring_next(6)[ring_prev(6)].tolist() == list(range(6))


def test_bad_tiles_give_a_clear_error():
    fab = Fabric(None, MeshLayout(4, 6))
    a = np.zeros((4, 6, 3, 2), np.float32)  # rows must be a multiple of 3, cols of 2
    b = np.zeros((4, 6, 3, 2), np.float32)
    with pytest.raises(MeshError, match="multiple of 12"):
        G.meshgemm(fab, np.zeros((4, 6, 2, 2), np.float32), b)
    with pytest.raises(MeshError, match="inner dimensions"):
        G.meshgemm(fab, a, np.zeros((4, 6, 6, 2), np.float32))


def test_one_rank_touches_no_mpi():
    fab = Fabric(None, MeshLayout(3, 5), trace=True)
    a, b = _matrices(7, 11, 5)
    np.testing.assert_allclose(G.matmul(fab, a, b), a @ b, rtol=1e-5, atol=1e-4)
    assert fab.trace == []


# ----------------------------------------------------------------------------------------------
# The schedule: traced bytes, ledger and the analytic estimators
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lay", as_params(_meshes(world().Get_size())))
def test_meshgemm_bytes_equal_the_schedule(lay):
    """Each ring step passes one logical tile per logical line across each rank boundary."""
    m, k, n = 23, 31, 19
    a, b = _matrices(m, k, n)
    fab = fabric(lay)
    mesh = (lay.py, lay.px)
    plan = E.GemmTiling.for_shapes(m, k, n, mesh)
    ab = hostio.local_block(fab, G.prepare_a(a, mesh))
    bb = hostio.local_block(fab, G.prepare_b(b, mesh))
    G.meshgemm(fab, ab, bb)
    nbr_x = sum(fab.peer(1, s) is not None for s in (-1, 1))
    nbr_y = sum(fab.peer(0, s) is not None for s in (-1, 1))
    item = 4
    tile_a, tile_b = plan.tmb * plan.tkb * item, plan.tkb * plan.tnb * item
    rows = np.arange(
        fab.origin[0] * plan.rows_per_core, (fab.origin[0] + lay.by) * plan.rows_per_core
    )
    p = ring_pos(plan.nl)[rows]
    skew_steps = np.minimum(p, plan.nl - p).sum()
    want = skew_steps * nbr_x * tile_a + plan.nl * (
        nbr_x * len(rows) * tile_a + nbr_y * lay.bx * plan.cols_per_core * tile_b
    )
    assert sum(r.nbytes for r in fab.trace if r.sent) == want
    assert sum(r.nbytes for r in fab.trace if not r.sent) == want
    assert_neighbour_only(fab)


def _kernel_ops(fab, name):
    return {k: v for k, v in fab.ledger.ops.items() if k.startswith(name + "/")}


@pytest.mark.parametrize(
    "algo,preskewed",
    [("meshgemm", True), ("meshgemm", False), ("cannon", True), ("cannon", False), ("summa", True)],
)
@pytest.mark.parametrize(
    "lay", as_params(_few(world().Get_size()) + [MeshLayout(1, 1)] * (world().Get_size() == 1))
)
def test_ledger_equals_estimate(algo, preskewed, lay):
    m, k, n = 29, 37, 23
    a, b = _matrices(m, k, n)
    estimate = {"meshgemm": E.estimate_meshgemm, "cannon": E.estimate_cannon}
    fab = fabric(lay)
    G.matmul(fab, a, b, algo=algo, b_preskewed=preskewed)
    mesh = (lay.py, lay.px)
    if algo == "summa":
        est = E.estimate_summa(m, k, n, mesh)
    else:
        est = estimate[algo](m, k, n, mesh, b_preskewed=preskewed)
    got = _kernel_ops(fab, algo)
    assert got.keys() == est.ops.keys()
    for op in got:
        assert got[op] == est.ops[op], op
    assert fab.ledger.peak_memory == est.peak_memory
    assert fab.ledger.max_routes == est.max_routes


@pytest.mark.parametrize("lay", as_params(_few(world().Get_size())))
def test_gemm_t_ledger_equals_estimate(lay):
    rng = np.random.default_rng(6)
    m, n, d = 21, 26, 17
    q = rng.standard_normal((m, d)).astype(np.float32)
    k = rng.standard_normal((n, d)).astype(np.float32)
    fab = fabric(lay)
    GR.matmul_t(fab, q, k)
    est = GR.estimate_grouped_gemm_t(m, n, d, 1, (lay.py, lay.px), name="gemm_t")
    got = _kernel_ops(fab, "gemm_t")
    assert got.keys() == est.ops.keys()
    for op in got:
        assert got[op] == est.ops[op], op
    assert fab.ledger.peak_memory == est.peak_memory
    assert fab.ledger.max_routes == est.max_routes


def test_paper_scale_estimates():
    """720 x 720 cores: MeshGEMM's steps cost two hops and 12 routes; Cannon's wrap costs 719
    hops; SUMMA needs a route per root and breaks WSE-2's 24."""
    mesh = (720, 720)
    mg = E.estimate_meshgemm(8192, 8192, 8192, mesh)
    cn = E.estimate_cannon(8192, 8192, 8192, mesh)
    su = E.estimate_summa(8192, 8192, 8192, mesh)
    step = mg.ops["meshgemm/step"]
    assert step.steps == 720 and step.hops == 2 * 720
    assert mg.ops["meshgemm/skew"].steps == 360
    assert mg.max_routes == 12 and not mg.violations()
    assert cn.ops["cannon/step"].hops == 719 * 720 and cn.max_routes <= 24
    assert su.max_routes == 1440 and any("routing" in v for v in su.violations())
    assert mg.cycles < cn.cycles < su.cycles
    gt = GR.estimate_grouped_gemm_t(4096, 4096, 4096, 1, mesh, name="gemm_t")
    assert gt.ops["gemm_t/step"].steps == 720 and gt.max_routes == 5


def test_non_square_mesh_uses_the_lcm_partition():
    plan = E.GemmTiling.for_shapes(37, 29, 41, (4, 6))
    assert (plan.nl, plan.cols_per_core, plan.rows_per_core) == (12, 2, 3)
    assert plan.tile_a == (3 * 4, 2 * 3) and plan.padded == (48, 36, 48)
    led = E.estimate_meshgemm(37, 29, 41, (4, 6))
    step = led.ops["meshgemm/step"]
    # a core holds 2 (x) and 3 (y) logical cores of each line: logical ring edges of two
    # logical cores are at most one physical hop, and edges inside a core are free
    assert step.steps == lcm(4, 6) and step.hops == lcm(4, 6) * 1
    assert E.estimate_cannon(37, 29, 41, (4, 6)).ops["cannon/step"].hops == 12 * 5


@pytest.mark.mpi
@pytest.mark.parametrize("lay", as_params(layouts(world().Get_size())[:2]))
def test_bfloat16_style_storage(lay):
    """Operands stored at bfloat16 precision, products accumulated in float32."""
    from meshrt.precision import round_to_bf16

    rng = np.random.default_rng(11)
    a = rng.standard_normal((21, 19)).astype(np.float32)
    b = rng.standard_normal((19, 23)).astype(np.float32)
    fab = fabric(lay)
    mesh = (lay.py, lay.px)
    ab = hostio.local_block(fab, G.prepare_a(a, mesh, dtype="bfloat16"))
    bb = hostio.local_block(fab, G.prepare_b(b, mesh, "meshgemm", dtype="bfloat16"))
    assert np.array_equal(ab, round_to_bf16(ab))
    c = hostio.gather_matrix(fab, G.meshgemm(fab, ab, bb), (21, 23), to_all=True)
    want = round_to_bf16(a).astype(np.float64) @ round_to_bf16(b).astype(np.float64)
    np.testing.assert_allclose(c, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("emulation", ["exact", "aggregated"])
def test_bench_gemm_runs_on_the_mover_asked_for(emulation):
    """``meshrt bench gemm --emulation``: the rows name the mover, and the product is right."""
    import logging

    from meshrt.bench import BenchSpec, bench_gemm

    comm = world()
    lay = layouts(comm.Get_size(), blocks=((2, 2),))[0]
    spec = BenchSpec(repeat=1, warmup=0, size=24, check=True, emulation=emulation)
    rows = bench_gemm(lay, spec, comm if comm.Get_size() > 1 else None, logging.getLogger())
    assert rows[0]["emulation"] == emulation
    if comm.Get_rank() == 0:
        assert rows[0]["max_abs_err"] < 1e-4
