"""Grouped GEMMs: products restricted to groups of features, every group at once.

The features of an operand carry *group labels* (one-hot per feature, stored per core; a zero
row marks a padding feature that belongs to no group). Two kernels, with the schedules of their
ungrouped versions:

* :func:`grouped_gemm_t`, dist-GEMM-T per group: ``C[:, :, g] = A[:, F_g] @ B[:, F_g]^T`` where
  ``F_g`` are the features labelled ``g`` (one group: dist-GEMM-T ``A @ B^T``, :func:`matmul_t`).
  A stays; B rotates along y on the interleaved two-hop ring with no skew (at step ``t`` logical
  row ``i`` holds B's segment ``L[(pos(i) - t) mod Nl]``); each step's partials (one per group)
  are chain-reduced along x to the column owning that segment of C. After ``Nl`` steps C is
  complete, in MeshGEMM's output layout, ready for ``S @ V``.
* :func:`grouped_meshgemm`, MeshGEMM with a grouped left operand:
  ``C[:, f] = sum_u A[:, u, g(f)] B[u, f]`` where ``g(f)`` is the label of output column ``f``.
  A (with its trailing group axis) is skewed along x on the mesh, B (computed on the mesh, so not
  pre-skewed by default) along y; then ``Nl`` compute-shift steps.

Labels never move: B keeps its columns (dist-GEMM-T rotates B along y only; MeshGEMM moves B
along y and column labels are per column), so every core keeps the one-hot rows of its own
features. Both kernels are written once over the fabric's mover (:mod:`meshrt.movers`).

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
from ..collectives import chain_cost
from ..fabric import Fabric
from ..mesh import MeshError, ceil_div, lcm, pad_to
from ..plmr import WSE2, Cost, Device, Ledger
from ._lines import line_of, ring_dest
from ._tiles import GemmTiling, logical_to_virtual, natural_tiles, priced_plan, virtual_to_logical
from .estimate import (
    gemm_t_routes,
    gemm_t_segments,
    gemm_t_step,
    pipelined_reduces,
    record,
    shift_gemm_costs,
    shift_gemm_routes,
)
from .gemm import shift_product

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
    """:func:`grouped_gemm_t_costs` of the reduces of every step, priced once per shape (the
    plan is immutable; every prefill layer repeats the same shapes)."""
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
    plan = GemmTiling.from_blocks_t(lay, a.shape, b.shape, name)
    cost_plan = priced_plan(plan, None if priced is None else (priced[0], priced[2], priced[1]))
    _check_labels(labels, (lay.by, lay.bx, a.shape[3]), name)
    if record:
        charge_grouped_gemm_t(fab.ledger, name, cost_plan, labels.shape[3])
    by, bx, rows = lay.by, lay.bx, plan.rows_per_core
    nl, tnb, td = plan.nl, plan.tnb, a.shape[3]
    y_line = line_of(fab, 0, rows)
    # B's rows: [by*rows, bx, tnb, D/Px], one logical row of cores per entry along y
    b_rows = b.reshape(by, bx, rows, tnb, td).transpose(0, 2, 1, 3, 4)
    b_rows = b_rows.reshape(by * rows, bx, tnb, td)
    tb = fab.mover.lines(
        fab,
        b_rows,
        0,
        y_line,
        lambda: np.broadcast_to(np.arange(nl), (bx, nl)),
        ("gemm_t", y_line, bx),
        name,
    )
    product = fab.mover.reduced_product_t(a, tb, labels, plan, name)
    dest = ring_dest(nl, RING)
    for t in range(nl):
        product.step(t)
        tb.permute(dest)
    return product.result()


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
    a_flat = a.reshape(a.shape[:3] + (a.shape[3] * groups,))  # K-major, group-minor
    if record:
        charge_grouped_meshgemm(fab.ledger, name, priced_plan(plan, priced), groups, b_preskewed)
    a_log, b_log = virtual_to_logical(a_flat, mesh), virtual_to_logical(b, mesh)
    c = shift_product(fab, a_log, b_log, RING, b_preskewed, name, labels)
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


def matmul_t(
    fab: Fabric,
    a: np.ndarray | None,
    b: np.ndarray | None,
    dtype=np.float32,
    root: int = 0,
    to_all: bool = False,
) -> np.ndarray | None:
    """dist-GEMM-T ``C = A @ B^T``: :func:`grouped_gemm_t` with every feature in one group
    (records ``gemm_t/...``). Scatters ``A[M, D]`` and ``B[N, D]`` from ``root`` and gathers
    ``C[M, N]`` on ``root`` (every rank with ``to_all``; ``None`` elsewhere)."""
    (m, d), (n, d2) = hostio.host_shapes(fab, a, b, root=root)
    if d != d2:
        raise ValueError(f"feature dimensions differ: A is {m}x{d}, B is {n}x{d2}")
    mesh = (fab.layout.py, fab.layout.px)
    is_root = fab.nranks == 1 or fab.control.rank == root
    ta = tb = tl = None
    if is_root and a is not None and b is not None:
        ta, tb = natural_tiles(a, mesh, dtype), natural_tiles(b, mesh, dtype)
        tl = label_tiles(np.zeros(d, np.int64), 1, mesh)  # every feature in group 0
    c = grouped_gemm_t(
        fab,
        hostio.scatter(fab, ta, root),
        hostio.scatter(fab, tb, root),
        hostio.scatter(fab, tl, root),
        name="gemm_t",
    )
    return hostio.gather_matrix(fab, c[..., 0], (m, n), root, to_all)


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


def charge_grouped_gemm_t(led: Ledger, name: str, plan: GemmTiling, groups: int) -> None:
    """Write the records of a :func:`grouped_gemm_t` run on ``plan``: its steps (the chain
    reduces of every step, tallied in closed form), its memory per core and its routing paths.
    The kernel and the estimator charge this, and only this."""
    record(led, name, _tallied_gemm_t_costs(plan, groups))
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
