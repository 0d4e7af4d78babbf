"""GEMM ``C = A @ B`` on the mesh: MeshGEMM and the Cannon and SUMMA baselines.

Layouts (rank blocks; ``Nl = lcm(Py, Px)``, every dimension padded to a multiple of ``Nl``):

* ``a``: ``f32[by, bx, M/Py, K/Px]``, core ``(py, px)`` holds ``A[M-seg py, K-seg px]`` (natural).
* ``b``: ``f32[by, bx, K/Py, N/Px]``; natural (``B[K-seg py, N-seg px]``) for SUMMA, or pre-skewed
  on the host by :func:`prepare_b` for MeshGEMM and Cannon (or skewed on the mesh with
  ``b_preskewed=False``, for a right operand computed on the mesh such as V in ``S @ V``).
* result ``f32[by, bx, M/Py, N/Px]``, core ``(py, px)`` holds ``C[M-seg py, N-seg px]``, the
  natural layout again, so GEMMs chain without re-layout.

MeshGEMM and Cannon are one algorithm on two rings (output-stationary Cannon): A is skewed on
the mesh (logical row ``i`` moves back ``pos(i)`` ring positions, the shorter way round), then
``Nl`` steps each multiply the resident tiles while A moves one ring step along x and B along y.
MeshGEMM's interleaved ring has edges of at most two hops; Cannon's ring closes with a wrap-around
edge that relays across the whole line. After ``Nl`` steps B is back where it started. The
schedule is written once, over the fabric's mover (:mod:`meshrt.movers`), which either moves and
multiplies core by core or tracks the tiles and forms each rank's products at the end.

A non-square mesh runs the square algorithm on the ``Nl x Nl`` logical mesh, each virtual core
standing for ``Nl/Py x Nl/Px`` logical cores (see :mod:`meshrt.ops._tiles`); logical moves inside
a core are local copies, only tiles crossing a core boundary use the fabric.

Storage may be 16-bit words (float16, or bfloat16 as ``uint16``, :mod:`meshrt.precision`): half
the words move, and each step widens its operands to float32; products accumulate in float32.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import numpy as np

from .. import hostio
from ..collectives import broadcast
from ..fabric import Fabric
from ..mesh import lcm
from ..plmr import Cost
from ..precision import widen
from ._lines import line_of, ring_dest, ring_positions
from ._tiles import (
    GemmTiling,
    logical_to_virtual,
    natural_tiles,
    preskewed_b_region,
    preskewed_b_tiles,
    priced_plan,
    virtual_to_logical,
)
from .estimate import (
    KERNEL_RINGS,
    charge_shift_gemm,
    record,
    summa_costs,
    summa_memory,
    summa_roots,
    summa_routes,
    summa_step,
)

ALGOS = ("meshgemm", "cannon", "summa")


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------


def prepare_a(a: np.ndarray, mesh: tuple[int, int], dtype=np.float32) -> np.ndarray:
    """Left operand tiles ``[Py, Px, M/Py, K/Px]`` (natural layout, zero-padded)."""
    return natural_tiles(a, mesh, dtype)


def prepare_b(
    b: np.ndarray, mesh: tuple[int, int], algo: str = "meshgemm", dtype=np.float32
) -> np.ndarray:
    """Right operand tiles ``[Py, Px, K/Py, N/Px]`` for ``algo``, ready to scatter or store.

    ``meshgemm`` and ``cannon`` pre-skew the tiles on the host (logical core ``(i, j)`` holds
    ``B[L[(pos i + pos j) mod Nl]-seg, j-seg]`` on the algorithm's ring), so a checkpoint
    converter can do it once, offline. ``summa`` (or ``natural``) keeps the natural layout.
    """
    if algo in ("summa", "natural"):
        return natural_tiles(b, mesh, dtype)
    if algo not in KERNEL_RINGS:
        raise ValueError(f"unknown GEMM algorithm {algo!r}; use one of {ALGOS}")
    pos = ring_positions(lcm(*mesh), KERNEL_RINGS[algo])
    return preskewed_b_tiles(b, mesh, pos, np.argsort(pos), dtype)


# ----------------------------------------------------------------------------------------------
# MeshGEMM and Cannon
# ----------------------------------------------------------------------------------------------


def shift_operands(
    fab: Fabric,
    a_log: np.ndarray,
    b_log: np.ndarray,
    kind: str,
    b_preskewed: bool,
    name: str,
) -> tuple:
    """MeshGEMM/Cannon's operands on the fabric's mover, skewed: A's lines along x (the rank's
    logical rows; identity = K segment), B's along y (the rank's logical columns).

    ``a_log``: logical tiles ``[by*r, bx*c, tmb, tkb*]`` (natural; ``r``, ``c``: logical rows
    and columns per virtual core); ``b_log``: ``[by*r, bx*c, tkb, tnb]``, pre-skewed (logical
    core ``(i, j)`` holds K segment ``order[(pos i + pos j) mod Nl]``), or natural with
    ``b_preskewed=False`` and skewed here. Returns the two
    :class:`~meshrt.movers.LineTiles`, ready for the ``Nl`` shift steps.
    """
    lay, mv = fab.layout, fab.mover
    nl = lcm(lay.py, lay.px)
    x_line, y_line = line_of(fab, 1, nl // lay.px), line_of(fab, 0, nl // lay.py)
    rows = np.arange(y_line.lo, y_line.hi)  # global logical rows / columns of this rank
    cols = np.arange(x_line.lo, x_line.hi)
    pos = ring_positions(nl, kind)

    def b_ids():
        if b_preskewed:
            return np.argsort(pos)[(pos[None, :] + pos[cols][:, None]) % nl]
        return np.broadcast_to(np.arange(nl), (len(cols), nl))

    lines = (kind, x_line, y_line)
    ta = mv.lines(
        fab,
        a_log,
        1,
        x_line,
        lambda: np.broadcast_to(np.arange(nl), (len(rows), nl)),
        ("shift", "A") + lines,
        name,
    )
    tb = mv.lines(fab, b_log, 0, y_line, b_ids, ("shift", "B", b_preskewed) + lines, name)
    ta.skew(pos[rows], kind)
    if not b_preskewed:
        tb.skew(pos[cols], kind)
    return ta, tb


def shift_product(
    fab: Fabric,
    a_log: np.ndarray,
    b_log: np.ndarray,
    kind: str,
    b_preskewed: bool,
    name: str,
    labels: np.ndarray | None = None,
) -> np.ndarray:
    """MeshGEMM/Cannon's schedule on logical tiles (see :func:`shift_operands`): the skews,
    then ``Nl`` steps, each multiplying the held tiles while A shifts along x and B along y (on
    the wafer the two shifts stream while the core multiplies, double buffered). ``labels``:
    the grouped MeshGEMM's column groups. Returns the product's logical tiles."""
    ta, tb = shift_operands(fab, a_log, b_log, kind, b_preskewed, name)
    product = fab.mover.shift_product(ta, tb, labels)
    dest = ring_dest(lcm(fab.layout.py, fab.layout.px), kind)
    for t in range(len(dest)):
        product.step(t)
        ta.permute(dest)
        tb.permute(dest)
    return product.result()


def _shift_gemm(
    fab: Fabric,
    a: np.ndarray,
    b: np.ndarray,
    kind: str,
    b_preskewed: bool,
    name: str,
    priced: tuple | None = None,
    record: bool = True,
) -> np.ndarray:
    """MeshGEMM (``kind="interleaved"``) or Cannon (``"linear"``) on the fabric's mover: the
    skews, then ``Nl`` steps that multiply the resident tiles while A moves one ring step along
    x and B along y."""
    lay = fab.layout
    mesh = (lay.py, lay.px)
    a, b = np.asarray(a), np.asarray(b)  # a weight placed on demand is placed once here
    plan = GemmTiling.from_blocks(lay, a.shape, b.shape, name)
    if record:
        charge_shift_gemm(fab.ledger, name, priced_plan(plan, priced), kind, b_preskewed)
    a_log, b_log = virtual_to_logical(a, mesh), virtual_to_logical(b, mesh)
    return logical_to_virtual(shift_product(fab, a_log, b_log, kind, b_preskewed, name), mesh)


def meshgemm(
    fab: Fabric,
    a: np.ndarray,
    b: np.ndarray,
    b_preskewed: bool = True,
    name: str = "meshgemm",
    priced: tuple | None = None,
    record: bool = True,
) -> np.ndarray:
    """MeshGEMM ``C = A @ B`` on the interleaved two-hop rings.

    Parameters
    ----------
    a : ndarray
        ``[by, bx, M/Py, K/Px]`` natural tiles (:func:`prepare_a`).
    b : ndarray
        ``[by, bx, K/Py, N/Px]`` tiles pre-skewed by ``prepare_b(..., "meshgemm")``; with
        ``b_preskewed=False`` natural tiles, skewed on the mesh first.
    priced : (m, k, n), optional
        Shapes the ledger prices (see :func:`meshrt.ops._tiles.priced_plan`).
    record : bool
        Write the ledger records (:func:`meshrt.ops.estimate.charge_shift_gemm`); ``False``:
        only compute (a caller that prices the op itself).

    Returns
    -------
    ndarray
        ``f32[by, bx, M/Py, N/Px]``: ``C[M-seg py, N-seg px]``.
    """
    return _shift_gemm(fab, a, b, "interleaved", b_preskewed, name, priced, record)


def cannon(
    fab: Fabric, a: np.ndarray, b: np.ndarray, b_preskewed: bool = True, name: str = "cannon"
) -> np.ndarray:
    """Cannon's algorithm: the same schedule on the plain cyclic ring, whose wrap-around edge
    relays each step's last tile across the whole line (``P - 1`` hops).

    Layouts as :func:`meshgemm`, with ``b`` pre-skewed by ``prepare_b(..., "cannon")``.
    """
    return _shift_gemm(fab, a, b, "linear", b_preskewed, name)


# ----------------------------------------------------------------------------------------------
# SUMMA
# ----------------------------------------------------------------------------------------------


def summa(fab: Fabric, a: np.ndarray, b: np.ndarray, name: str = "summa") -> np.ndarray:
    """SUMMA: for every K block, multicast A's block along x and B's along y, then multiply.

    Parameters
    ----------
    a : ndarray
        ``[by, bx, M/Py, K/Px]`` natural tiles.
    b : ndarray
        ``[by, bx, K/Py, N/Px]`` natural tiles (``prepare_b(..., "summa")``).

    Returns
    -------
    ndarray
        ``f32[by, bx, M/Py, N/Px]``: ``C[M-seg py, N-seg px]``.
    """
    lay = fab.layout
    plan = GemmTiling.from_blocks(lay, a.shape, b.shape, name)
    led = fab.ledger
    by, bx = lay.by, lay.bx
    tm, tn = plan.tile_c
    cols, rows = plan.cols_per_core, plan.rows_per_core  # logical cores per virtual core
    a_blocks = a.reshape(by, bx, tm, cols, plan.tkb)  # [.., tm, K-block within core, tkb]
    b_blocks = b.reshape(by, bx, rows, plan.tkb, tn)
    c = np.zeros((by, bx, tm, tn), np.float32)
    steps: Counter[Cost] = Counter()
    for kb in range(plan.nl):
        col, row = summa_roots(plan, kb)
        panel_a = broadcast(
            fab, a_blocks[:, :, :, kb % cols], 1, col, record=False, name=f"{name}/broadcast"
        )
        panel_b = broadcast(
            fab, b_blocks[:, :, kb % rows], 0, row, record=False, name=f"{name}/broadcast"
        )
        c += np.matmul(widen(panel_a), widen(panel_b))
        steps[summa_step(plan, kb, led.device)] += 1
    record(led, name, summa_costs(plan, steps))
    led.memory(name, summa_memory(plan))
    led.routes(name, summa_routes(plan))
    return c


# ----------------------------------------------------------------------------------------------
# Convenience: host matrices in, host matrix out
# ----------------------------------------------------------------------------------------------

KERNELS: dict[str, Callable[..., np.ndarray]] = {
    "meshgemm": meshgemm,
    "cannon": cannon,
    "summa": summa,
}


def matmul(
    fab: Fabric,
    a: np.ndarray | None,
    b: np.ndarray | None,
    algo: str = "meshgemm",
    dtype=np.float32,
    b_preskewed: bool = True,
    root: int = 0,
    to_all: bool = False,
) -> np.ndarray | None:
    """Scatter ``A`` and ``B`` from ``root``, run ``algo``, gather ``C = A @ B``.

    For tests and benchmarks: host I/O is control plane (priced as edge I/O). Ranks other than
    ``root`` may pass ``None``. Returns ``C[M, N]`` (float32) on ``root``, or on every rank with
    ``to_all``; ``None`` elsewhere. ``b_preskewed=False`` scatters natural B tiles and lets
    MeshGEMM / Cannon skew them on the mesh.
    """
    if algo not in KERNELS:
        raise ValueError(f"unknown GEMM algorithm {algo!r}; use one of {ALGOS}")
    (m, k), (k2, n) = hostio.host_shapes(fab, a, b, root=root)
    if k != k2:
        raise ValueError(f"inner dimensions differ: A is {m}x{k}, B is {k2}x{n}")
    mesh = (fab.layout.py, fab.layout.px)
    is_root = fab.nranks == 1 or fab.control.rank == root
    b_algo = algo if b_preskewed else "natural"
    ta = prepare_a(a, mesh, dtype) if is_root and a is not None else None
    tb = prepare_b(b, mesh, b_algo, dtype) if is_root and b is not None else None
    a_blk = hostio.scatter(fab, ta, root)
    b_blk = hostio.scatter(fab, tb, root)
    kwargs = {} if algo == "summa" else {"b_preskewed": b_preskewed}
    c_blk = KERNELS[algo](fab, a_blk, b_blk, **kwargs)
    return hostio.gather_matrix(fab, c_blk, (m, n), root, to_all)


def prepare_b_region(
    get,
    shape: tuple[int, int],
    mesh: tuple[int, int],
    origin: tuple[int, int],
    block: tuple[int, int],
    algo: str = "meshgemm",
    storage: str = "float32",
) -> np.ndarray:
    """One rank's block of :func:`prepare_b` (MeshGEMM/Cannon pre-skew) made straight from a
    reader ``get(rows, cols)`` of the padded ``B[K, N]``: no global array is built.

    Returns ``[by, bx, K/Py, N/Px]`` in ``storage`` words (:func:`meshrt.precision.word_dtype`).
    """
    if algo not in KERNEL_RINGS:
        raise ValueError(f"pre-skewed placement is for {sorted(KERNEL_RINGS)}, not {algo!r}")
    pos = ring_positions(lcm(*mesh), KERNEL_RINGS[algo])
    return preskewed_b_region(get, shape, mesh, pos, np.argsort(pos), origin, block, storage)
