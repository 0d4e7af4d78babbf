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
edge that relays across the whole line. After ``Nl`` steps B is back where it started.

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
from ._lines import (
    line_of,
    permute_line,
    ring_dest,
    ring_positions,
    shift_lines_back,
)
from ._tiles import (
    GemmTiling,
    logical_to_virtual,
    natural_tiles,
    preskewed_b_region,
    preskewed_b_tiles,
    priced_plan,
    virtual_to_logical,
)
from ._tracked import LineSchedule, TrackedLines
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


def _as_f32(x: np.ndarray, buf: np.ndarray | None) -> np.ndarray:
    """``x`` as float32 values (16-bit storage words widened into ``buf``)."""
    return x if buf is None else widen(x, out=buf)


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
    lay = fab.layout
    mesh = (lay.py, lay.px)
    a, b = np.asarray(a), np.asarray(b)  # a weight placed on demand is placed once here
    plan = GemmTiling.from_blocks(lay, a.shape, b.shape, name)
    if record:
        charge_shift_gemm(fab.ledger, name, priced_plan(plan, priced), kind, b_preskewed)
    if fab.aggregate:
        ta, tb = track_shift_operands(
            fab,
            virtual_to_logical(a, mesh),
            virtual_to_logical(b, mesh),
            kind,
            b_preskewed,
            name,
        )
        b_held, b_ids = tb.held()
        return logical_to_virtual(stored_product(ta.complete(), b_held, b_ids=b_ids), mesh)

    nl = plan.nl
    x_line, y_line = line_of(fab, 1, plan.cols_per_core), line_of(fab, 0, plan.rows_per_core)
    rows = np.arange(y_line.lo, y_line.hi)  # global logical rows / columns of this rank
    cols = np.arange(x_line.lo, x_line.hi)
    pos = ring_positions(nl, kind)
    # a_cur: [by*b, bx*a, tmb, tkb]   b_cur: [by*b, bx*a, tkb, tnb]   (logical tiles)
    a_cur = shift_lines_back(
        fab, virtual_to_logical(a, mesh), 1, x_line, pos[rows], kind, op=f"{name}/skew"
    )
    b_cur = virtual_to_logical(b, mesh)
    if not b_preskewed:
        b_cur = shift_lines_back(fab, b_cur, 0, y_line, pos[cols], kind, op=f"{name}/skew")

    a_bufs = (np.empty_like(a_cur), a_cur)
    b_bufs = (np.empty_like(b_cur), np.empty_like(b_cur))
    f32 = np.float32
    a32 = None if a_cur.dtype == f32 else np.empty(a_cur.shape, f32)
    b32 = None if b_cur.dtype == f32 else np.empty(b_cur.shape, f32)
    c = np.empty(a_cur.shape[:3] + b_cur.shape[3:], f32)  # [by*b, bx*a, tmb, tnb]
    partial = np.empty_like(c)
    dest = ring_dest(nl, kind)
    for t in range(nl):
        # on the wafer the two shifts stream while the core multiplies (double buffers)
        np.matmul(_as_f32(a_cur, a32), _as_f32(b_cur, b32), out=c if t == 0 else partial)
        if t:
            c += partial
        a_cur = permute_line(fab, a_cur, 1, dest, x_line, out=a_bufs[t % 2], op=f"{name}/shift")
        b_cur = permute_line(fab, b_cur, 0, dest, y_line, out=b_bufs[t % 2], op=f"{name}/shift")
    return logical_to_virtual(c, mesh)


def shift_schedules(fab: Fabric, kind: str, b_preskewed: bool) -> tuple:
    """The tracked moves of MeshGEMM/Cannon's operands on this rank, worked out once per
    layout (kept in :attr:`meshrt.fabric.Fabric.plans`).

    Returns ``(sa, sb, skew_a, skew_b, steps)``: the :class:`~meshrt.ops._tracked.LineSchedule`
    of A (lines along x, identity = K segment) and of B (lines along y, identity = K segment),
    the skews' messages of each, and per shift step the pair of A's and B's messages.
    """
    lay = fab.layout
    nl = lcm(lay.py, lay.px)
    x_line, y_line = line_of(fab, 1, nl // lay.px), line_of(fab, 0, nl // lay.py)
    key = ("shift_operands", kind, b_preskewed, x_line, y_line)
    if key in fab.plans:
        return fab.plans[key]
    rows = np.arange(y_line.lo, y_line.hi)
    cols = np.arange(x_line.lo, x_line.hi)
    pos = ring_positions(nl, kind)
    order = np.argsort(pos)
    sa = LineSchedule(1, x_line, np.broadcast_to(np.arange(nl), (len(rows), nl)))
    skew_a = sa.shift_lines_back(pos[rows], kind, op="skew")
    if b_preskewed:  # logical core (i, j) holds K segment order[(pos i + pos j) mod Nl]
        b_ids = order[(pos[None, :] + pos[cols][:, None]) % nl]
    else:
        b_ids = np.broadcast_to(np.arange(nl), (len(cols), nl))
    sb = LineSchedule(0, y_line, b_ids)
    skew_b = [] if b_preskewed else sb.shift_lines_back(pos[cols], kind, op="skew")
    dest = ring_dest(nl, kind)
    steps = [(sa.permute(dest, op="shift"), sb.permute(dest, op="shift")) for _ in range(nl)]
    fab.plans[key] = sa, sb, skew_a, skew_b, steps
    return fab.plans[key]


def track_shift_operands(
    fab: Fabric,
    a_log: np.ndarray,
    b_log: np.ndarray,
    kind: str,
    b_preskewed: bool,
    name: str,
):
    """The skews and the ``Nl`` shift steps of MeshGEMM/Cannon on tracked tiles (aggregated
    emulation): the same neighbour messages as the exact schedule, local moves relabelled.

    ``a_log``: logical tiles ``[by*b, bx*a, tmb, tkb*]`` (natural); ``b_log``: ``[by*b, bx*a,
    tkb, tnb]`` (pre-skewed, or natural with ``b_preskewed=False``). Returns the
    :class:`~meshrt.ops._tracked.TrackedLines` of A (lines along x, identity = K segment) and of
    B (lines along y, identity = K segment). The schedules are worked out once per layout
    (:func:`shift_schedules`); a call replays their messages.
    """
    sa, sb, skew_a, skew_b, steps = shift_schedules(fab, kind, b_preskewed)
    ta = TrackedLines(fab, a_log, 1, sa.line, schedule=sa)
    tb = TrackedLines(fab, b_log, 0, sb.line, schedule=sb)
    prefix = f"{name}/"
    ta.play(skew_a, prefix)
    tb.play(skew_b, prefix)
    for moves_a, moves_b in steps:
        ta.play(moves_a, prefix)
        tb.play(moves_b, prefix)
    return ta, tb


def _batched_columns(nl: int, m: int, tkb: int, tnb: int, gathered: bool, chunk_bytes: int) -> int:
    """Columns per batched product in :func:`stored_product` (0: multiply whole GEMMs instead).

    A batched product multiplies every K segment's tile on its own (``Nl`` partials per output
    tile, summed after), reading B where it is held; worth it while the partials are small and
    the K segments long enough for an efficient GEMM.
    """
    per_column = 4 * nl * m * (tnb + (tkb if gathered else 0))
    return chunk_bytes // per_column if tkb >= 32 else 0


def stored_product(
    a_store: np.ndarray,
    b_store: np.ndarray,
    col_groups=None,
    chunk_bytes: int = 64 << 20,
    b_ids: np.ndarray | None = None,
) -> np.ndarray:
    """What every core of the rank accumulates over the shift steps, as a few GEMMs.

    Parameters
    ----------
    a_store : ndarray
        ``[R, Nl, tmb, tkb]`` (or ``[R, Nl, tmb, tkb * G]``, group-minor, with ``col_groups``):
        A's tiles of the rank's logical rows by K segment.
    b_store : ndarray
        ``[Nl, C, tkb, tnb]``: B's tiles of the rank's logical columns by K segment (16-bit
        words are widened a chunk at a time); with ``b_ids``, in the order they are held.
    col_groups : ndarray, optional
        ``[C * tnb, G]`` one-hot group of every output column: column ``f`` multiplies A's group
        ``g(f)`` slice (:func:`meshrt.ops.grouped.grouped_meshgemm`); a zero row gives 0.
    b_ids : ndarray, optional
        ``int[C, Nl]``: the K segment of ``b_store[i, c]`` is ``b_ids[c, i]``
        (:meth:`meshrt.ops._tracked.TrackedLines.held`); by default ``i``.

    Returns
    -------
    ndarray
        ``f32[R, C, tmb, tnb]``: every logical core's ``sum_k A[r, k] @ B[k, c]``.
    """
    r, nl, tmb = a_store.shape[:3]
    _, c, tkb, tnb = b_store.shape
    if col_groups is None:
        step = _batched_columns(nl, r * tmb, tkb, tnb, b_ids is not None, chunk_bytes)
        if step:
            return _batched_product(a_store, b_store, b_ids, step)
    rows = None if b_ids is None else np.argsort(b_ids, axis=1)  # [C, Nl]: row of K segment
    out = np.zeros((r, tmb, c, tnb), np.float32)
    if col_groups is None:
        a_mat = widen(np.ascontiguousarray(a_store.transpose(0, 2, 1, 3))).reshape(r * tmb, -1)
        step = max(1, chunk_bytes // max(1, 4 * nl * tkb * tnb))
        for c0 in range(0, c, step):  # B in K order and widened a chunk of columns at a time
            c1 = min(c, c0 + step)
            part = b_store[:, c0:c1] if rows is None else b_store[rows[c0:c1].T, np.arange(c0, c1)]
            b_mat = widen(part).transpose(0, 2, 1, 3).reshape(nl * tkb, -1)
            out[:, :, c0:c1] = (a_mat @ b_mat).reshape(r, tmb, c1 - c0, tnb)
        return np.ascontiguousarray(out.transpose(0, 2, 1, 3))
    groups = col_groups.shape[1]
    if rows is not None:
        b_store = b_store[rows.T, np.arange(c)]
    b_mat = widen(b_store).transpose(0, 2, 1, 3).reshape(nl * tkb, c * tnb)
    picked = [(g, np.flatnonzero(col_groups[:, g])) for g in range(groups)]
    cols = [(g, f, b_mat[:, f] * col_groups[f, g]) for g, f in picked if f.size]
    flat = out.reshape(r * tmb, c * tnb)
    a5 = a_store.reshape(r, nl, tmb, tkb, groups)
    step = max(1, chunk_bytes // max(1, 4 * nl * tmb * tkb * groups))
    for r0 in range(0, r, step):  # A made group-major a chunk of rows at a time
        r1 = min(r, r0 + step)
        a_g = widen(np.ascontiguousarray(a5[r0:r1].transpose(4, 0, 2, 1, 3)))
        a_g = a_g.reshape(groups, (r1 - r0) * tmb, nl * tkb)
        for g, f, b_g in cols:
            flat[r0 * tmb : r1 * tmb, f] = a_g[g] @ b_g
    return np.ascontiguousarray(out.transpose(0, 2, 1, 3))


def _batched_product(
    a_store: np.ndarray, b_store: np.ndarray, b_ids: np.ndarray | None, step: int
) -> np.ndarray:
    """:func:`stored_product` as one batched GEMM per chunk of ``step`` columns: every held B
    tile ``[tkb, tnb]`` (read in place) times the A segment of its K segment, then summed over
    K segments. No copy of B (float32 words)."""
    r, nl, tmb, tkb = a_store.shape
    c, tnb = b_store.shape[1], b_store.shape[3]
    m = r * tmb
    a_seg = widen(np.ascontiguousarray(a_store.transpose(1, 0, 2, 3))).reshape(nl, m, tkb)
    out = np.empty((c, m, tnb), np.float32)
    for c0 in range(0, c, step):
        c1 = min(c, c0 + step)
        a_g = a_seg[None] if b_ids is None else a_seg[b_ids[c0:c1]]  # [C', Nl, m, tkb]
        b_t = widen(b_store[:, c0:c1]).transpose(1, 0, 2, 3)  # [C', Nl, tkb, tnb]
        np.sum(np.matmul(a_g, b_t), axis=1, out=out[c0:c1])
    return np.ascontiguousarray(out.reshape(c, r, tmb, tnb).transpose(1, 0, 2, 3))


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
