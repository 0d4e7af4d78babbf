"""dist-GEMM-T ``C = A @ B^T`` (attention scores ``Q K^T``) with no transpose anywhere.

Layouts (rank blocks; ``Nl = lcm(Py, Px)``, every dimension padded to a multiple of ``Nl``):

* ``a``: ``f32[by, bx, M/Py, D/Px]``, core ``(py, px)`` holds ``A[seq-seg py, dim-seg px]``.
* ``b``: ``f32[by, bx, N/Py, D/Px]``, core ``(py, px)`` holds ``B[seq-seg py, dim-seg px]``:
  the same natural layout as ``a`` (K in prefill, the KV cache in decode). It is not modified.
* result ``f32[by, bx, M/Py, N/Px]``: ``C[seq-seg py, seq-seg px]``, MeshGEMM's output layout,
  ready for ``S @ V``.

Schedule (the paper's code, on the ``Nl x Nl`` logical mesh): A stays; B rotates along y on the
interleaved two-hop ring with no skew. At step ``t`` logical row ``i`` holds B's sequence segment
``L[(pos(i) - t) mod Nl]`` in every column; each core multiplies ``A_tile @ B_tile^T`` over its
dim segment (the B shift streams meanwhile), and the partial is chain-reduced along x to the
column that owns that segment of C. After ``Nl`` steps C is complete and B is back home.
Any ``Py x Px`` mesh works; on a non-square mesh a virtual core holds ``b = Nl/Py`` logical rows,
each with its own reduce root.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from .. import hostio
from ..collectives import reduce_to_root
from ..fabric import Fabric
from ..mesh import MeshError, lcm
from ..plmr import Cost
from ._lines import line_of, permute_line, ring_dest
from ._tiles import GemmTiling, natural_tiles
from .estimate import (
    gemm_t_costs,
    gemm_t_memory,
    gemm_t_reduce,
    gemm_t_routes,
    gemm_t_segments,
    record,
)


def plan_from_blocks(layout, a_shape: tuple, b_shape: tuple, what: str = "A @ B^T") -> GemmTiling:
    """The plan of ``a: [by, bx, M/Py, D/Px]`` and ``b: [by, bx, N/Py, D/Px]``.

    Its ``tkb`` is the logical dim segment and ``tnb`` the logical segment of B's sequence.
    """
    py, px = layout.py, layout.px
    nl = lcm(py, px)
    per_x, per_y = nl // px, nl // py
    for name, shape in (("A", a_shape), ("B", b_shape)):
        if len(shape) != 4 or tuple(shape[:2]) != (layout.by, layout.bx):
            raise MeshError(
                f"{what}: {name} block has shape {tuple(shape)}; expected "
                f"({layout.by}, {layout.bx}, seq, dim) on {layout}"
            )
        if shape[2] % per_y or shape[3] % per_x:
            raise MeshError(
                f"{what}: {name} tiles are {shape[2]}x{shape[3]}, but a {py}x{px} "
                f"mesh is cut into a {nl}x{nl} logical mesh: pad every dimension to a "
                f"multiple of {nl} (prepare_gemm_t does)"
            )
    if a_shape[3] != b_shape[3]:
        raise MeshError(
            f"{what}: A tiles hold {a_shape[3]} features per core, B tiles {b_shape[3]}"
        )
    return GemmTiling(py, px, a_shape[2] // per_y, a_shape[3] // per_x, b_shape[2] // per_y)


def prepare_gemm_t(a: np.ndarray, b: np.ndarray, mesh: tuple[int, int], dtype=np.float32):
    """Host tiles of ``A[M, D]`` and ``B[N, D]``.

    Returns ``([Py, Px, M/Py, D/Px], [Py, Px, N/Py, D/Px])``, natural and zero-padded.
    """
    return natural_tiles(a, mesh, dtype), natural_tiles(b, mesh, dtype)


def gemm_t(fab: Fabric, a: np.ndarray, b: np.ndarray, name: str = "gemm_t") -> np.ndarray:
    """``C = A @ B^T`` with B rotating along y and chain reduces along x.

    Parameters
    ----------
    a : ndarray
        ``[by, bx, M/Py, D/Px]``: ``A[seq-seg py, dim-seg px]``.
    b : ndarray
        ``[by, bx, N/Py, D/Px]``: ``B[seq-seg py, dim-seg px]``.

    Returns
    -------
    ndarray
        ``f32[by, bx, M/Py, N/Px]``: ``C[seq-seg py, seq-seg px]``.
    """
    lay = fab.layout
    plan = plan_from_blocks(lay, a.shape, b.shape, name)
    led = fab.ledger
    by, bx, rows_per, cols_per = lay.by, lay.bx, plan.rows_per_core, plan.cols_per_core
    tmb, tnb, td = plan.tmb, plan.tnb, a.shape[3]
    y_line = line_of(fab, 0, rows_per)

    a_rows = a.reshape(by, bx, rows_per, tmb, td).astype(np.float32, copy=False)
    # b_cur: [by*b, bx, tnb, D/Px]: one logical row of B per entry along y
    b_cur = b.reshape(by, bx, rows_per, tnb, td).transpose(0, 2, 1, 3, 4)
    b_cur = b_cur.reshape(by * rows_per, bx, tnb, td)
    bufs = (np.empty_like(b_cur), np.empty_like(b_cur))
    c = np.zeros((by, bx, rows_per, tmb, cols_per, tnb), np.float32)
    iy, ix = np.arange(by)[:, None], np.arange(bx)[None, :]
    my_rows = fab.index(0)
    dest = ring_dest(plan.nl, "interleaved")
    reduces: Counter[Cost] = Counter()
    for t in range(plan.nl):
        # [by, bx, b, D/Px, tnb]: B^T as a view
        b_t = b_cur.reshape(by, rows_per, bx, tnb, td).transpose(0, 2, 1, 4, 3)
        part = np.matmul(a_rows, b_t.astype(np.float32, copy=False))  # [by, bx, b, tmb, tnb]
        seg = gemm_t_segments(plan, t)  # [Nl] per logical row
        for s in range(rows_per):
            seg_s = seg[np.arange(lay.py) * rows_per + s]  # per virtual row
            red = reduce_to_root(
                fab, part[:, :, s], 1, seg_s // cols_per, record=False, name=f"{name}/reduce"
            )
            slot = (seg_s % cols_per)[my_rows][:, None]
            c[iy, ix, s, :, slot, :] += red
        reduces[gemm_t_reduce(plan, seg // cols_per)] += 1
        b_cur = permute_line(fab, b_cur, 0, dest, y_line, out=bufs[t % 2], op=f"{name}/shift")
    record(led, name, gemm_t_costs(plan, reduces))
    led.memory(name, gemm_t_memory(plan))
    led.routes(name, gemm_t_routes(plan))
    return c.reshape(by, bx, rows_per * tmb, cols_per * tnb)


def matmul_t(
    fab: Fabric,
    a: np.ndarray | None,
    b: np.ndarray | None,
    dtype=np.float32,
    root: int = 0,
    to_all: bool = False,
) -> np.ndarray | None:
    """Scatter ``A[M, D]`` and ``B[N, D]`` from ``root``, run :func:`gemm_t`, gather ``A @ B^T``.

    Returns ``C[M, N]`` on ``root`` (every rank with ``to_all``), ``None`` elsewhere.
    """
    (m, d), (n, d2) = hostio.host_shapes(fab, a, b, root=root)
    if d != d2:
        raise ValueError(f"feature dimensions differ: A is {m}x{d}, B is {n}x{d2}")
    mesh = (fab.layout.py, fab.layout.px)
    is_root = fab.nranks == 1 or fab.control.rank == root
    ta, tb = (
        prepare_gemm_t(a, b, mesh, dtype)
        if is_root and a is not None and b is not None
        else (None, None)
    )
    c_blk = gemm_t(fab, hostio.scatter(fab, ta, root), hostio.scatter(fab, tb, root))
    return hostio.gather_matrix(fab, c_blk, (m, n), root, to_all)
