"""Grouped GEMMs: products restricted to groups of features, every group at once.

The features of an operand carry *group labels* (one-hot per feature, stored per core; a zero
row marks a padding feature that belongs to no group). Two kernels, with the schedules of their
ungrouped versions:

* :func:`grouped_gemm_t`, dist-GEMM-T per group: ``C[:, :, g] = A[:, F_g] @ B[:, F_g]^T`` where
  ``F_g`` are the features labelled ``g``. A stays; B rotates along y on the interleaved two-hop
  ring; each step's partials (one per group) are chain-reduced along x to the owning column.
* :func:`grouped_meshgemm`, MeshGEMM with a grouped left operand:
  ``C[:, f] = sum_u A[:, u, g(f)] B[u, f]`` where ``g(f)`` is the label of output column ``f``.
  A (with its trailing group axis) is skewed along x on the mesh, B (computed on the mesh, so not
  pre-skewed by default) along y; then ``Nl`` compute-shift steps.

Labels never move: B keeps its columns (gemm_t rotates B along y only; MeshGEMM moves B along y
and column labels are per column), so every core keeps the one-hot rows of its own features.

Layouts (rank blocks; ``Nl = lcm(Py, Px)``; every dimension padded to a multiple of ``Nl``;
``G`` groups):

==================  =============================  ==============================================
kernel              operands                       result
==================  =============================  ==============================================
grouped_gemm_t      a ``[by, bx, M/Py, D/Px]``     ``f32[by, bx, M/Py, N/Px, G]``
                    b ``[by, bx, N/Py, D/Px]``     (MeshGEMM's output layout, per group)
                    labels ``[by, bx, D/Px, G]``
grouped_meshgemm    a ``[by, bx, M/Py, K/Px, G]``  ``f32[by, bx, M/Py, N/Px]`` (natural)
                    b ``[by, bx, K/Py, N/Px]``
                    labels ``[by, bx, N/Px, G]``
==================  =============================  ==============================================

Pricing: MACs as the ungrouped kernel (each feature belongs to one group, so a core does the
same multiply-adds); words scaled by ``G`` where a tile carries the group axis (A's tile in the
grouped MeshGEMM; the partials reduced by the grouped dist-GEMM-T). The closed-form estimators
at the end write exactly what the kernels record.
"""

from __future__ import annotations

import functools
from collections import Counter

import numpy as np

from .. import hostio
from ..collectives import chain_cost, reduce_to_root
from ..fabric import Fabric
from ..mesh import MeshError, ceil_div, lcm, pad_to
from ..plmr import WSE2, Cost, Device, Ledger
from ._lines import (
    HI,
    LO,
    line_of,
    permute_line,
    ring_dest,
    ring_positions,
    shift_lines_back,
)
from ._tiles import GemmTiling, logical_to_virtual, natural_tiles, priced_plan, virtual_to_logical
from ._tracked import LineSchedule, TrackedLines
from .estimate import (
    gemm_t_routes,
    gemm_t_segments,
    gemm_t_step,
    pipelined_reduces,
    record,
    shift_gemm_costs,
    shift_gemm_routes,
)
from .gemm import stored_product, track_shift_operands
from .gemm_t import plan_from_blocks

RING = "interleaved"


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------


def label_tiles(labels, n_groups: int, mesh: tuple[int, int], dtype=np.float32) -> np.ndarray:
    """One-hot group labels of ``D`` features, laid out per feature segment.

    Parameters
    ----------
    labels : int[D]
        Group of each feature, ``-1`` for features in no group (padding).
    n_groups : int

    Returns
    -------
    ndarray
        ``[Py, Px, D/Px, G]``: core ``(py, px)`` holds the rows of feature segment ``px`` (the
        same on every row of cores); ``D`` is padded to a multiple of ``lcm(Py, Px)`` with
        zero rows.
    """
    py, px = mesh
    labels = np.asarray(labels, dtype=np.int64)
    d = ceil_div(labels.size, lcm(py, px)) * lcm(py, px)
    onehot = np.zeros((d, n_groups), dtype=dtype)
    real = np.flatnonzero(labels >= 0)
    if real.size and labels[real].max() >= n_groups:
        raise ValueError(f"labels go up to {labels[real].max()} but n_groups={n_groups}")
    onehot[real, labels[real]] = 1
    seg = onehot.reshape(px, d // px, n_groups)
    return np.ascontiguousarray(np.broadcast_to(seg[None], (py,) + seg.shape))


def grouped_a_tiles(a: np.ndarray, mesh: tuple[int, int], dtype=np.float32) -> np.ndarray:
    """Left operand ``A[M, K, G]`` of :func:`grouped_meshgemm` as ``[Py, Px, M/Py, K/Px, G]``
    (natural layout; ``M`` and ``K`` zero-padded to multiples of ``lcm(Py, Px)``)."""
    nl = lcm(*mesh)
    m, k, g = a.shape
    mp, kp = ceil_div(m, nl) * nl, ceil_div(k, nl) * nl
    flat = pad_to(np.asarray(a, dtype=dtype), (mp, kp, g)).reshape(mp, kp * g)
    t = natural_tiles(flat, mesh, dtype)
    return t.reshape(t.shape[:3] + (kp // mesh[1], g))


# ----------------------------------------------------------------------------------------------
# Closed-form costs (shared by the kernels and the estimators)
# ----------------------------------------------------------------------------------------------


def grouped_gemm_costs(plan: GemmTiling, groups: int, b_preskewed: bool, device: Device) -> tuple:
    """Skew and main-loop costs of :func:`grouped_meshgemm`: MeshGEMM's, with A tiles ``G``
    times longer."""
    return shift_gemm_costs(plan, RING, b_preskewed, device, a_factor=groups)


def grouped_gemm_memory(plan: GemmTiling, groups: int) -> int:
    """Words per core: double-buffered grouped A and B tiles, the C tile, the labels."""
    a_words = plan.tile_a[0] * plan.tile_a[1] * groups
    b_words = plan.tile_b[0] * plan.tile_b[1]
    return 2 * a_words + 2 * b_words + plan.tile_c[0] * plan.tile_c[1] + plan.tile_c[1] * groups


def grouped_gemm_t_reduce(plan: GemmTiling, roots: np.ndarray, groups: int) -> Cost:
    """One step's chain reduces of ``G`` partials toward ``roots``."""
    return chain_cost(plan.px, roots, plan.rows_per_core * plan.tmb * plan.tnb * groups)


def grouped_gemm_t_costs(plan: GemmTiling, reduces: Counter) -> list:
    """dist-GEMM-T's step (same MACs and B shift) and the tallied grouped chain reduces."""
    return [gemm_t_step(plan)] + pipelined_reduces(reduces)


def grouped_gemm_t_memory(plan: GemmTiling, groups: int) -> int:
    """Words per core: A, double-buffered B, labels, and the C and partial tiles per group."""
    tm, td = plan.tile_a
    tn_b = plan.rows_per_core * plan.tnb
    return (
        tm * td
        + 2 * tn_b * td
        + td * groups
        + groups * (tm * plan.cols_per_core * plan.tnb + tm * plan.tnb)
    )


def _gemm_t_tally(plan: GemmTiling, groups: int) -> Counter:
    return Counter(
        grouped_gemm_t_reduce(plan, gemm_t_segments(plan, t) // plan.cols_per_core, groups)
        for t in range(plan.nl)
    )


@functools.lru_cache(maxsize=256)
def _tallied_gemm_t_costs(plan: GemmTiling, groups: int) -> tuple:
    """:func:`grouped_gemm_t_costs` of the aggregated kernel, priced once per shape (the plan
    is immutable; every prefill layer repeats the same shapes)."""
    return tuple(grouped_gemm_t_costs(plan, _gemm_t_tally(plan, groups)))


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


def _check_labels(labels: np.ndarray, shape: tuple, what: str) -> None:
    if labels.ndim != 4 or tuple(labels.shape[:3]) != tuple(shape):
        raise MeshError(
            f"{what}: labels block has shape {tuple(labels.shape)}; expected "
            f"{tuple(shape)} + (groups,)"
        )


def grouped_gemm_t(
    fab: Fabric,
    a: np.ndarray,
    b: np.ndarray,
    labels: np.ndarray,
    name: str = "grouped_gemm_t",
    priced: tuple | None = None,
    record: bool = True,
) -> np.ndarray:
    """``C[:, :, g] = A[:, F_g] @ B[:, F_g]^T`` for every group ``g``, with no transpose.

    Parameters
    ----------
    a : ndarray
        ``[by, bx, M/Py, D/Px]``: ``A[row-seg py, feature-seg px]`` (stays put).
    b : ndarray
        ``[by, bx, N/Py, D/Px]``: ``B[row-seg py, feature-seg px]`` (rotates along y).
    labels : ndarray
        ``[by, bx, D/Px, G]``: one-hot group of each local feature (:func:`label_tiles`).
    priced : (m, n, d), optional
        Shapes the ledger prices (see :func:`meshrt.ops._tiles.priced_plan`).

    Returns
    -------
    ndarray
        ``f32[by, bx, M/Py, N/Px, G]``: ``C[row-seg py, row-seg px, g]``.
    """
    lay = fab.layout
    plan = plan_from_blocks(lay, a.shape, b.shape, name)
    cost_plan = priced_plan(plan, None if priced is None else (priced[0], priced[2], priced[1]))
    _check_labels(labels, (lay.by, lay.bx, a.shape[3]), name)
    groups = labels.shape[3]
    by, bx, rows_per, cols_per = lay.by, lay.bx, plan.rows_per_core, plan.cols_per_core
    tmb, tnb, td = plan.tmb, plan.tnb, a.shape[3]
    f32 = np.float32
    y_line = line_of(fab, 0, rows_per)
    if fab.aggregate and (labels == labels[:1]).all():
        c = _grouped_gemm_t_aggregated(fab, a, b, labels, plan, cost_plan, name)
        if record:
            charge_grouped_gemm_t(fab.ledger, name, cost_plan, groups)
        return c
    # al: [by, bx, b, tmb*G, D/Px]: A's rows masked by each group's features (A stays: once)
    lab_t = np.swapaxes(labels, 2, 3).astype(f32, copy=False)  # [by, bx, G, D/Px]
    al = (
        a.reshape(by, bx, rows_per, tmb, 1, td).astype(f32, copy=False)
        * lab_t[:, :, None, None, :, :]
    )
    al = al.reshape(by, bx, rows_per, tmb * groups, td)
    # b_cur: [by*b, bx, tnb, D/Px]: one logical row of B per entry along y
    b_cur = b.reshape(by, bx, rows_per, tnb, td).transpose(0, 2, 1, 3, 4)
    b_cur = b_cur.reshape(by * rows_per, bx, tnb, td)
    bufs = (np.empty_like(b_cur), np.empty_like(b_cur))
    c = np.zeros((by, bx, rows_per, tmb, groups, cols_per, tnb), f32)
    iy, ix = np.arange(by)[:, None], np.arange(bx)[None, :]
    my_rows = fab.index(0)
    dest = ring_dest(plan.nl, RING)
    reduces: Counter[Cost] = Counter()
    for t in range(plan.nl):
        b_t = b_cur.reshape(by, rows_per, bx, tnb, td).transpose(0, 2, 1, 4, 3)  # B^T view
        part = np.matmul(al, b_t.astype(f32, copy=False))  # [by, bx, b, tmb*G, tnb]
        part = part.reshape(by, bx, rows_per, tmb, groups, tnb)
        seg = gemm_t_segments(plan, t)  # [Nl] per logical row
        for s in range(rows_per):
            seg_s = seg[np.arange(lay.py) * rows_per + s]  # per virtual row
            red = reduce_to_root(
                fab, part[:, :, s], 1, seg_s // cols_per, record=False, name=f"{name}/reduce"
            )  # [by, bx, tmb, G, tnb]
            slot = (seg_s % cols_per)[my_rows][:, None]
            c[iy, ix, s, :, :, slot, :] += red
        reduces[grouped_gemm_t_reduce(cost_plan, seg // cols_per, groups)] += 1
        b_cur = permute_line(fab, b_cur, 0, dest, y_line, out=bufs[t % 2], op=f"{name}/shift")
    if record:
        charge_grouped_gemm_t(fab.ledger, name, cost_plan, groups, reduces)
    c = c.transpose(0, 1, 2, 3, 5, 6, 4)  # [by, bx, b, tmb, a, tnb, G]
    return np.ascontiguousarray(c).reshape(by, bx, rows_per * tmb, cols_per * tnb, groups)


def _grouped_gemm_t_aggregated(
    fab: Fabric, a, b, labels, plan: GemmTiling, cost_plan: GemmTiling, name: str
) -> np.ndarray:
    """:func:`grouped_gemm_t` in aggregated emulation: the same neighbour messages, computed
    per rank instead of per core.

    B's ring steps run on tracked tiles (:class:`~meshrt.ops._tracked.TrackedLines`), so the rank
    ends up with every B segment its rows held. The rank's part of every row's partial over its
    feature columns is then one GEMM per group, ``RP[r, n] = A[r, F_rank] B[n, F_rank]^T``, and
    each step's chain reduces pass along x the carries the wafer's chains pass across the rank
    boundaries (lines whose root lies on the sender's side send nothing on the wafer; their
    slots in the message carry 0). B's shift messages all come before the reduce messages:
    the same messages, in another order.
    """
    lay = fab.layout
    by, bx, rows_per, cols_per = lay.by, lay.bx, plan.rows_per_core, plan.cols_per_core
    tmb, tnb, td = plan.tmb, plan.tnb, a.shape[3]
    groups = labels.shape[3]
    f32 = np.float32
    nl = plan.nl
    y_line = line_of(fab, 0, rows_per)
    b_cur = b.reshape(by, bx, rows_per, tnb, td).transpose(0, 2, 1, 3, 4)
    b_cur = b_cur.reshape(by * rows_per, bx, tnb, td)
    key = ("gemm_t_shift", y_line, bx)
    if key not in fab.plans:  # B's ring steps, worked out once per layout
        schedule = LineSchedule(0, y_line, np.broadcast_to(np.arange(nl), (bx, nl)))
        dest = ring_dest(nl, RING)
        fab.plans[key] = schedule, [schedule.permute(dest, op="shift") for _ in range(nl)]
    schedule, steps = fab.plans[key]
    tb = TrackedLines(fab, b_cur, 0, y_line, schedule=schedule)
    for moves in steps:
        tb.play(moves, f"{name}/")
    b_mat = tb.complete().transpose(0, 2, 1, 3).reshape(nl * tnb, bx * td)  # [N, F_rank]
    a_mat = a.transpose(0, 2, 1, 3).reshape(by * rows_per * tmb, bx * td)  # [M_rank, F_rank]
    feat = labels[0].reshape(bx * td, groups).astype(f32, copy=False)
    present = np.flatnonzero(feat.any(axis=0))
    rp = np.empty((len(present), by * rows_per, tmb, nl, tnb), f32)  # RP per present group
    for i, g in enumerate(present):
        f = np.flatnonzero(feat[:, g])
        rp[i] = ((a_mat[:, f] * feat[f, g]) @ b_mat[:, f].T).reshape(rp.shape[1:])
    del b_mat, a_mat
    c = np.zeros((by, bx, rows_per, tmb, cols_per, tnb, groups), f32)
    r, nr = fab.coords[1], lay.rx
    op = f"{name}/reduce"
    part = np.zeros((by, 1, tmb, groups, tnb), f32)  # the rank's partial per row
    every = len(present) == groups
    for lrows, n_seg, up_mask, down_mask, mine, col, slot, s in _gemm_t_reduce_plan(fab, plan):
        # rp[:, lrows, :, n_seg] is [by, Gp, tmb, tnb] (advanced axes first)
        picked = rp[:, lrows, :, n_seg].transpose(0, 2, 1, 3)
        if every:
            part[:, 0] = picked
        else:
            part[:, 0][:, :, present] = picked
        below = above = None
        if 0 < r < nr - 1:
            below = fab.recv(part.shape, f32, 1, LO, op=op)
        if r < nr - 1:  # up the chain, and the carry coming down, in one Sendrecv
            carry = part if below is None else part + below
            up = np.where(up_mask, carry, f32(0))
            above = fab.exchange(up, 1, HI, op, part.shape)
        if r > 0:
            carry = part if above is None else part + above
            down = np.where(down_mask, carry, f32(0))
            if r < nr - 1:
                fab.send(down, 1, LO, op=op)
            else:  # the top of the chain: what comes up, and what goes down, in one Sendrecv
                below = fab.exchange(down, 1, LO, op, part.shape, True)
        total = part
        if below is not None:
            total = below + total
        if above is not None:
            total = total + above
        c[mine, col, s, :, slot] = total[mine, 0].transpose(0, 1, 3, 2)
    return c.reshape(by, bx, rows_per * tmb, cols_per * tnb, groups)


def _gemm_t_reduce_plan(fab: Fabric, plan: GemmTiling) -> list:
    """Per step ``t`` and logical row ``s`` of a virtual core, the index arrays of
    :func:`_grouped_gemm_t_aggregated`'s chain reduces on this rank, worked out once per
    layout: ``(lrows, n_seg, up_mask, down_mask, mine, col, slot, s)`` with ``lrows`` the
    rank's logical rows, ``n_seg`` the B segment each holds, the masks of the rows whose root
    lies above / below this rank (``[by, 1, 1, 1, 1]``), and the rows rooted here (``mine``)
    with their virtual column and slot."""
    lay = fab.layout
    rows_per, cols_per = plan.rows_per_core, plan.cols_per_core
    key = ("gemm_t_reduce", plan.nl, rows_per, cols_per)
    if key in fab.plans:
        return fab.plans[key]
    x0, x1 = fab.origin[1], fab.origin[1] + lay.bx
    vrows = fab.index(0)
    steps = []
    for t in range(plan.nl):
        seg = gemm_t_segments(plan, t)  # [Nl] per logical row
        for s in range(rows_per):
            lrows = np.arange(lay.by) * rows_per + s  # the rank's logical rows
            n_seg = seg[vrows * rows_per + s]  # B segment held by each
            root = n_seg // cols_per
            shape = (lay.by, 1, 1, 1, 1)
            mine = np.flatnonzero((root >= x0) & (root < x1))
            steps.append(
                (
                    lrows,
                    n_seg,
                    (root >= x1).reshape(shape),
                    (root < x0).reshape(shape),
                    mine,
                    root[mine] - x0,
                    n_seg[mine] % cols_per,
                    s,
                )
            )
    fab.plans[key] = steps
    return steps


def grouped_meshgemm(
    fab: Fabric,
    a: np.ndarray,
    b: np.ndarray,
    labels: np.ndarray,
    b_preskewed: bool = False,
    name: str = "grouped_meshgemm",
    priced: tuple | None = None,
    record: bool = True,
) -> np.ndarray:
    """``C[:, f] = sum_u A[:, u, g(f)] B[u, f]`` on MeshGEMM's interleaved rings.

    Parameters
    ----------
    a : ndarray
        ``[by, bx, M/Py, K/Px, G]``: ``A[row-seg py, K-seg px, :]`` (natural, group axis last).
    b : ndarray
        ``[by, bx, K/Py, N/Px]``: natural tiles, skewed on the mesh first; or tiles pre-skewed
        by ``prepare_b(..., "meshgemm")`` with ``b_preskewed=True``.
    labels : ndarray
        ``[by, bx, N/Px, G]``: one-hot group of each local output column (of B's columns).
    priced : (m, k, n), optional
        Shapes the ledger prices (see :func:`meshrt.ops._tiles.priced_plan`).

    Returns
    -------
    ndarray
        ``f32[by, bx, M/Py, N/Px]``: ``C[row-seg py, col-seg px]``.
    """
    lay = fab.layout
    mesh = (lay.py, lay.px)
    if a.ndim != 5:
        raise MeshError(f"{name}: A block must be [by, bx, M/Py, K/Px, G], got {a.shape}")
    groups = a.shape[4]
    plan = GemmTiling.from_blocks(lay, a.shape[:4], b.shape, name)
    _check_labels(labels, (lay.by, lay.bx, b.shape[3]), name)
    if labels.shape[3] != groups:
        raise MeshError(f"{name}: A carries {groups} groups, labels {labels.shape[3]}")
    nl, ca, rb = plan.nl, plan.cols_per_core, plan.rows_per_core
    tkb, tnb = plan.tkb, plan.tnb
    f32 = np.float32
    x_line, y_line = line_of(fab, 1, ca), line_of(fab, 0, rb)
    rows = np.arange(y_line.lo, y_line.hi)
    cols = np.arange(x_line.lo, x_line.hi)
    pos = ring_positions(nl, RING)

    # a_cur: [by*b, bx*a, tmb, tkb*G] (K-major, group-minor)   b_cur: [by*b, bx*a, tkb, tnb]
    a_flat = a.reshape(a.shape[:3] + (a.shape[3] * groups,))
    if record:
        charge_grouped_meshgemm(fab.ledger, name, priced_plan(plan, priced), groups, b_preskewed)
    if fab.aggregate and (labels == labels[:1]).all():
        # aggregated emulation: the same messages; each core's products summed as one GEMM
        ta, tb = track_shift_operands(
            fab,
            virtual_to_logical(a_flat, mesh),
            virtual_to_logical(b, mesh),
            RING,
            b_preskewed,
            name,
        )
        col_groups = labels[0].reshape(-1, groups).astype(f32, copy=False)
        b_held, b_ids = tb.held()
        return logical_to_virtual(
            stored_product(ta.complete(), b_held, col_groups, b_ids=b_ids), mesh
        )
    a_cur = shift_lines_back(
        fab, virtual_to_logical(a_flat, mesh), 1, x_line, pos[rows], RING, op=f"{name}/skew"
    )
    b_cur = virtual_to_logical(b, mesh)
    if not b_preskewed:
        b_cur = shift_lines_back(fab, b_cur, 0, y_line, pos[cols], RING, op=f"{name}/skew")
    # labels per logical core, transposed: [by*b, bx*a, 1, G, tnb] (they never move)
    lab = labels.reshape(lay.by, lay.bx * ca, tnb, groups)
    lab = np.repeat(np.swapaxes(lab, 2, 3)[:, :, None], rb, axis=0).astype(f32, copy=False)

    a_bufs = (np.empty_like(a_cur), a_cur)
    b_bufs = (np.empty_like(b_cur), np.empty_like(b_cur))
    c = np.empty(a_cur.shape[:3] + (tnb,), f32)  # [by*b, bx*a, tmb, tnb]
    partial = np.empty_like(c)
    dest = ring_dest(nl, RING)
    bl_shape = b_cur.shape[:2] + (tkb * groups, tnb)
    for t in range(nl):
        # B's columns masked by their group: bl[k, g, n] = B[k, n] [g(n) == g]
        bl = (b_cur.astype(f32, copy=False)[:, :, :, None, :] * lab).reshape(bl_shape)
        np.matmul(a_cur.astype(f32, copy=False), bl, out=c if t == 0 else partial)
        if t:
            c += partial
        a_cur = permute_line(fab, a_cur, 1, dest, x_line, out=a_bufs[t % 2], op=f"{name}/shift")
        b_cur = permute_line(fab, b_cur, 0, dest, y_line, out=b_bufs[t % 2], op=f"{name}/shift")
    return logical_to_virtual(c, mesh)


# ----------------------------------------------------------------------------------------------
# Host matrices in, host matrix out (tests, benchmarks); control plane, priced as edge I/O
# ----------------------------------------------------------------------------------------------


def matmul_t_grouped(
    fab: Fabric, a, b, labels, n_groups: int, root: int = 0, to_all: bool = False
) -> np.ndarray | None:
    """Scatter ``A[M, D]``, ``B[N, D]`` and the feature labels ``int[D]`` from ``root``; run
    :func:`grouped_gemm_t`; gather ``C[M, N, G]`` on ``root`` (every rank with ``to_all``)."""
    (m, d), (n, _) = hostio.host_shapes(fab, a, b, root=root)
    mesh = (fab.layout.py, fab.layout.px)
    is_root = fab.nranks == 1 or fab.control.rank == root
    ta = natural_tiles(a, mesh) if is_root else None
    tb = natural_tiles(b, mesh) if is_root else None
    tl = label_tiles(labels, n_groups, mesh) if is_root else None
    c = grouped_gemm_t(
        fab,
        hostio.scatter(fab, ta, root),
        hostio.scatter(fab, tb, root),
        hostio.scatter(fab, tl, root),
    )
    tiles = hostio.gather(fab, c, root, to_all)
    if tiles is None:
        return None
    py, px, tm, tn, g = tiles.shape
    return tiles.transpose(0, 2, 1, 3, 4).reshape(py * tm, px * tn, g)[:m, :n]


def matmul_grouped(
    fab: Fabric, a, b, labels, b_preskewed: bool = False, root: int = 0, to_all: bool = False
) -> np.ndarray | None:
    """Scatter ``A[M, K, G]``, ``B[K, N]`` and the column labels ``int[N]`` from ``root``; run
    :func:`grouped_meshgemm`; gather ``C[M, N]``. ``b_preskewed`` pre-skews B on the host."""
    from .gemm import prepare_b

    (m, _, g), (_, n) = hostio.host_shapes(fab, a, b, root=root)
    mesh = (fab.layout.py, fab.layout.px)
    is_root = fab.nranks == 1 or fab.control.rank == root
    ta = grouped_a_tiles(a, mesh) if is_root else None
    tb = prepare_b(b, mesh, "meshgemm" if b_preskewed else "natural") if is_root else None
    tl = label_tiles(labels, g, mesh) if is_root else None
    c = grouped_meshgemm(
        fab,
        hostio.scatter(fab, ta, root),
        hostio.scatter(fab, tb, root),
        hostio.scatter(fab, tl, root),
        b_preskewed=b_preskewed,
    )
    return hostio.gather_matrix(fab, c, (m, n), root, to_all)


# ----------------------------------------------------------------------------------------------
# Closed-form estimators (tied to the ledger by tests)
# ----------------------------------------------------------------------------------------------


def charge_grouped_gemm_t(
    led: Ledger, name: str, plan: GemmTiling, groups: int, reduces: Counter | None = None
) -> None:
    """Write the records of a :func:`grouped_gemm_t` run on ``plan``: its steps (``reduces``:
    the reductions the run made, by cost; default: the closed-form tally), its memory per core
    and its routing paths. The kernel and the estimator charge this, and only this."""
    costs = (
        _tallied_gemm_t_costs(plan, groups)
        if reduces is None
        else grouped_gemm_t_costs(plan, reduces)
    )
    record(led, name, costs)
    led.memory(name, grouped_gemm_t_memory(plan, groups))
    led.routes(name, gemm_t_routes(plan))


def charge_grouped_meshgemm(
    led: Ledger, name: str, plan: GemmTiling, groups: int, b_preskewed: bool
) -> None:
    """Write the records of a :func:`grouped_meshgemm` run on ``plan``: its steps, its memory
    per core and its routing paths. The kernel and the estimator charge this, and only this."""
    record(led, name, grouped_gemm_costs(plan, groups, b_preskewed, led.device))
    led.memory(name, grouped_gemm_memory(plan, groups))
    led.routes(name, shift_gemm_routes(plan, RING, b_preskewed))


def estimate_grouped_gemm_t(
    m: int,
    n: int,
    d: int,
    groups: int,
    mesh: tuple[int, int],
    device: Device | None = None,
    ledger: Ledger | None = None,
    name: str = "grouped_gemm_t",
) -> Ledger:
    """The ledger :func:`grouped_gemm_t` writes for ``[m, d] x [n, d]^T`` with ``groups``."""
    led = ledger if ledger is not None else Ledger(device or WSE2)
    charge_grouped_gemm_t(led, name, GemmTiling.for_shapes(m, d, n, mesh), groups)
    return led


def estimate_grouped_meshgemm(
    m: int,
    k: int,
    n: int,
    groups: int,
    mesh: tuple[int, int],
    device: Device | None = None,
    b_preskewed: bool = False,
    ledger: Ledger | None = None,
    name: str = "grouped_meshgemm",
) -> Ledger:
    """The ledger :func:`grouped_meshgemm` writes for ``[m, k, G] x [k, n]``."""
    led = ledger if ledger is not None else Ledger(device or WSE2)
    charge_grouped_meshgemm(led, name, GemmTiling.for_shapes(m, k, n, mesh), groups, b_preskewed)
    return led
