"""Collectives along x and y: rank-encoded data, closed-form answers, ledger and trace checks."""

import numpy as np
import pytest
from meshtest import assert_neighbour_only, core_ids, fabric, layout_params, world

from meshrt import collectives as C
from meshrt.mesh import MeshLayout

pytestmark = [pytest.mark.mpi, pytest.mark.usefixtures("each_mover")]

VEC = (3,)


def _line_values(fab, axis):
    """Global ids of the cores on each of this rank's lines, shape (lines_in_block, N)."""
    lay = fab.layout
    g = np.arange(lay.py * lay.px, dtype=np.float64).reshape(lay.py, lay.px)
    return g[:, fab.index(1)].T if axis == 0 else g[fab.index(0), :]


def _expand(fab, axis, per_line):
    """Per-line values (lines,) to a block (by, bx, *VEC)."""
    v = per_line[None, :] if axis == 0 else per_line[:, None]
    return np.broadcast_to(v[..., None], (fab.by, fab.bx) + VEC)


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("op", ["sum", "max"])
@pytest.mark.parametrize("lay", layout_params())
def test_reduce_to_root_scalar_and_per_line(axis, op, lay):
    n = lay.cores(axis)
    lines = lay.cores(1 - axis)
    for root in {0, n - 1, n // 2, tuple((np.arange(lines) * 7) % n)}:
        fab = fabric(lay)
        r = np.array(root) if isinstance(root, tuple) else root
        got = C.reduce_to_root(fab, core_ids(fab, VEC), axis, r, op)
        vals = _line_values(fab, axis)
        want_line = vals.sum(1) if op == "sum" else vals.max(1)
        roots = np.broadcast_to(np.asarray(r), (lines,))[fab.index(1 - axis)]
        idx = fab.index(axis)
        is_root = (
            (idx[:, None] == roots[None, :]) if axis == 0 else (idx[None, :] == roots[:, None])
        )
        want = np.where(is_root[..., None], _expand(fab, axis, want_line), 0)
        np.testing.assert_array_equal(got, want)
        assert_neighbour_only(fab)


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("lay", layout_params())
def test_broadcast_from_root(axis, lay):
    n = lay.cores(axis)
    for root in (0, n - 1, (n - 1) // 2):
        fab = fabric(lay)
        got = C.broadcast(fab, core_ids(fab, VEC), axis, root)
        want = _expand(fab, axis, _line_values(fab, axis)[:, root])
        np.testing.assert_array_equal(got, want)
        assert_neighbour_only(fab)


ALGOS = [
    ("ktree", {}),
    ("ktree", {"groups": 2}),
    ("ktree", {"levels": 3}),
    ("ktree", {"levels": 1}),
    ("pipeline", {}),
    ("ring", {}),
]


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("op", ["sum", "max"])
@pytest.mark.parametrize("algo,kw", ALGOS)
@pytest.mark.parametrize("lay", layout_params())
def test_allreduce_every_core_gets_line_result(axis, op, algo, kw, lay):
    if kw.get("groups", 0) > lay.cores(axis):
        pytest.skip(f"{kw['groups']} groups need more than {lay.cores(axis)} cores")
    fab = fabric(lay)
    got = C.allreduce(fab, core_ids(fab, VEC), axis, op, C.AllreduceSpec(algo, **kw))
    vals = _line_values(fab, axis)
    want = _expand(fab, axis, vals.sum(1) if op == "sum" else vals.max(1))
    np.testing.assert_array_equal(got, want)
    assert_neighbour_only(fab)


def test_ktree_plan_and_cost_closed_form():
    # 12 cores, 3 groups of 4 with roots 2, 6, 10; second level roots 2, 6, 10 -> 6
    plan = C.ktree_levels(12, groups=3)
    assert [s[2] for s in plan[0]] == [2, 6, 10]
    assert [s[2] for s in plan[1]] == [6]
    cost = C.ktree_cost(12, words=5, groups=3)
    assert [(c.hops, c.routings) for c in cost] == [(2, 2), (4, 1), (6, 0)]
    # the paper's critical path: N hops in total, about K * N^(1/K) / 2 routings
    for n in (16, 64, 100, 720):
        cost = C.ktree_cost(n, words=1, levels=2)
        hops = sum(c.hops for c in cost)
        assert n - 1 <= hops <= n + 2 * int(np.ceil(np.sqrt(n)))
        assert sum(c.routings for c in cost) <= int(np.ceil(np.sqrt(n)) + 2)


@pytest.mark.parametrize("axis", [0, 1])
def test_ledger_matches_closed_form(axis):
    lay = MeshLayout(6, 8, *_grid())
    n = lay.cores(axis)
    words = int(np.prod(VEC))
    fab = fabric(lay)
    C.reduce_to_root(fab, core_ids(fab, VEC), axis, 1)
    t = fab.ledger.ops["chain_reduce"]
    d = max(1, n - 2)
    assert (t.hops, t.routings, t.words) == (d, d, words)
    a, b = fab.ledger.device.alpha, fab.ledger.device.beta
    comm = a * d + b * d + words * fab.ledger.device.wavelet_cycles
    assert t.cycles == pytest.approx(max(comm, words / fab.ledger.device.macs_per_cycle))

    fab = fabric(lay)
    C.allreduce(fab, core_ids(fab, VEC), axis, spec=C.AllreduceSpec("pipeline"))
    tot = fab.ledger.totals()
    assert (tot.hops, tot.routings) == (2 * (n - 1), n - 1)

    fab = fabric(lay)
    C.allreduce(fab, core_ids(fab, VEC), axis, spec=C.AllreduceSpec("ring"))
    t = fab.ledger.ops["allreduce_ring"]
    assert t.steps == 2 * (n - 1) and t.hops == 2 * 2 * (n - 1) and t.routings == 2 * (n - 1)
    assert fab.ledger.max_routes == 3

    fab = fabric(lay)
    C.allreduce(fab, core_ids(fab, VEC), axis, spec=C.AllreduceSpec("ktree", levels=2))
    cost = C.ktree_cost(n, words, levels=2)
    tot = fab.ledger.totals()
    assert tot.hops == sum(c.hops for c in cost)
    assert tot.routings == sum(c.routings for c in cost)
    assert fab.ledger.max_routes == 3  # K + 1 at the tree root


def _grid():
    size = world().Get_size()
    return {1: (1, 1), 2: (2, 1), 3: (3, 1), 4: (2, 2), 6: (3, 2)}.get(size, (1, size))


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("lay", layout_params())
def test_chain_reduce_mpi_bytes_closed_form(axis, lay):
    fab = fabric(lay)
    C.reduce_to_root(fab, core_ids(fab, VEC), axis, 0)
    r, nr = fab.coords[axis], lay.ranks(axis)
    line_bytes = lay.block(1 - axis) * int(np.prod(VEC)) * 8
    sent = sum(t.nbytes for t in fab.trace if t.sent)
    assert sent == line_bytes * ((r < nr - 1) + (r > 0))


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("lay", layout_params())
def test_aggregated_ktree_same_result_and_ledger_fewer_messages(axis, lay):
    exact, agg = fabric(lay, mover="exact"), fabric(lay, mover="aggregated")
    a = C.allreduce(exact, core_ids(exact, VEC), axis, spec=C.AllreduceSpec(levels=3))
    b = C.allreduce(agg, core_ids(agg, VEC), axis, spec=C.AllreduceSpec(levels=3))
    np.testing.assert_array_equal(a, b)
    assert exact.ledger.ops == agg.ledger.ops
    assert_neighbour_only(agg)
    # one sweep each way: a rank sends at most one message per direction
    assert len([t for t in agg.trace if t.sent]) <= 2
