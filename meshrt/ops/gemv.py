"""MeshGEMV ``y = x @ W`` and its allreduce baselines.

Vector layouts (decode's alternation; no transpose ever happens):

* **Y-vector**: core ``(py, px)`` holds segment ``py`` of the vector, replicated along x.
  Block: ``f32[by, bx, *batch, L/Py]``.
* **X-vector**: core ``(py, px)`` holds segment ``px``, replicated along y.
  Block: ``f32[by, bx, *batch, L/Px]``.

A Y-vector input multiplies tiles ``W[in-seg py, out-seg px]`` (``f32[M/Py, N/Px]``); the partial
products are summed along y, so the output comes out as an X-vector. An X-vector input multiplies
tiles placed transposed, ``W[in-seg px, out-seg py]`` (``f32[M/Px, N/Py]``), sums along x, and
yields a Y-vector. The allreduce is MeshGEMV's K-tree by default; ``pipeline`` and ``ring`` are
the baselines (Cerebras' GEMV and the GPU default).
"""
from __future__ import annotations

import numpy as np

from ..collectives import KTREE, AllreduceSpec, allreduce
from ..fabric import Fabric
from ..mesh import X, Y, ceil_div, pad_to
from ..plmr import Cost, Device, Ledger

AXIS = {"y": Y, "x": X}


def _in_axis(input_axis: str) -> int:
    if input_axis not in AXIS:
        raise ValueError(f"input_axis must be 'y' or 'x', not {input_axis!r}")
    return AXIS[input_axis]


def weight_tiles(w: np.ndarray, mesh_shape: tuple[int, int], input_axis: str = "y",
                 dtype=np.float32) -> np.ndarray:
    """Host-side placement of ``W[M, N]`` for :func:`meshgemv`.

    Returns
    -------
    ndarray
        ``input_axis="y"``: ``tiles[py, px] = W[in-seg py, out-seg px]``, ``f32[Py, Px, M/Py, N/Px]``.
        ``input_axis="x"``: ``tiles[py, px] = W[in-seg px, out-seg py]``, ``f32[Py, Px, M/Px, N/Py]``.
        Segments are zero-padded, so padding never changes a result.
    """
    py, px = mesh_shape
    m, n = w.shape
    if _in_axis(input_axis) == Y:
        tm, tn = ceil_div(m, py), ceil_div(n, px)
        t = pad_to(w.astype(dtype, copy=False), (py * tm, px * tn)).reshape(py, tm, px, tn)
        return np.ascontiguousarray(t.transpose(0, 2, 1, 3))
    tm, tn = ceil_div(m, px), ceil_div(n, py)
    t = pad_to(w.astype(dtype, copy=False), (px * tm, py * tn)).reshape(px, tm, py, tn)
    return np.ascontiguousarray(t.transpose(2, 0, 1, 3))


def vector_tiles(x: np.ndarray, mesh_shape: tuple[int, int], axis: str = "y") -> np.ndarray:
    """Host-side layout of a vector (or ``[*batch, L]`` vectors) as a Y- or X-vector.

    Returns ``f32[Py, Px, *batch, seg]`` with the segment replicated along the other axis.
    """
    py, px = mesh_shape
    a = _in_axis(axis)
    parts = (py, px)[a]
    seg = ceil_div(x.shape[-1], parts)
    xp = pad_to(x, x.shape[:-1] + (parts * seg,)).reshape(x.shape[:-1] + (parts, seg))
    xp = np.moveaxis(xp, -2, 0)  # (parts, *batch, seg)
    out = xp[:, None] if a == Y else xp[None, :]
    return np.ascontiguousarray(np.broadcast_to(out, (py, px) + xp.shape[1:]))


def vector_from_tiles(tiles: np.ndarray, length: int, axis: str) -> np.ndarray:
    """Inverse of :func:`vector_tiles` (reads one replica): ``[*batch, length]``."""
    line = tiles[:, 0] if _in_axis(axis) == Y else tiles[0, :]
    v = np.moveaxis(line, 0, -2)
    return v.reshape(v.shape[:-2] + (-1,))[..., :length]


def local_gemv(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Every core's partial ``x_tile @ w_tile``: ``f32[by, bx, *batch, K] x f32[by, bx, K, N]``."""
    if x.ndim == 3:
        return np.einsum("abk,abkn->abn", x, w, optimize=False)
    return np.matmul(x, w[:, :, None] if x.ndim > 4 else w)


def local_cost(batch: int, tile_rows: int, tile_cols: int) -> Cost:
    """Every core's ``[batch, tile_rows] @ [tile_rows, tile_cols]`` partial product.

    The CE issues one vector ``fmach`` per input element (row of the tile) over the
    ``tile_cols`` outputs (the public CSL code's ``@map`` over ``Mt``): ``batch * tile_rows``
    vector instructions.
    """
    return Cost(macs=batch * tile_rows * tile_cols, vectors=batch * tile_rows)


def memory_words(batch: int, tile_rows: int, tile_cols: int) -> int:
    """Words per core: the weight tile, the input segment and the partial product."""
    return tile_rows * tile_cols + batch * (tile_rows + tile_cols)


def meshgemv(fab: Fabric, x: np.ndarray, w: np.ndarray, input_axis: str = "y",
             spec: AllreduceSpec = KTREE, name: str = "meshgemv",
             priced: tuple | None = None) -> np.ndarray:
    """``y = x @ W`` on the mesh.

    Parameters
    ----------
    x : ndarray
        ``input_axis="y"``: Y-vector block ``f32[by, bx, *batch, M/Py]``;
        ``"x"``: X-vector block ``f32[by, bx, *batch, M/Px]``.
    w : ndarray
        Weight block from :func:`weight_tiles` with the same ``input_axis``:
        ``f32[by, bx, M/Py, N/Px]`` or ``f32[by, bx, M/Px, N/Py]``.
    spec : AllreduceSpec
        Allreduce of the partial products (MeshGEMV's K-tree by default).
    priced : (int, int), optional
        Weight tile ``(rows, cols)`` the ledger prices, when the blocks carry more padding than
        the modeled device would (at most the block's tile).

    Returns
    -------
    ndarray
        The other orientation: an X-vector ``f32[by, bx, *batch, N/Px]`` for a Y-vector input,
        a Y-vector ``f32[by, bx, *batch, N/Py]`` for an X-vector input.
    """
    axis = _in_axis(input_axis)
    if x.shape[-1] != w.shape[2]:
        raise ValueError(f"vector segment {x.shape[-1]} does not match weight tile rows {w.shape[2]}"
                         f" (input_axis={input_axis!r})")
    batch = int(np.prod(x.shape[2:-1], dtype=np.int64))
    led = fab.ledger
    tm, tn = priced if priced is not None else w.shape[2:]
    if tm > w.shape[2] or tn > w.shape[3]:
        raise ValueError(f"priced tile {tm}x{tn} exceeds the weight tile {w.shape[2:]}")
    led.charge(f"{name}/local", local_cost(batch, tm, tn))
    led.memory(name, memory_words(batch, tm, tn))
    part = local_gemv(x, w) if x.dtype == w.dtype else local_gemv(x.astype(np.float32),
                                                                  w.astype(np.float32))
    out = allreduce(fab, part, axis, "sum", spec, record=False, name=f"{name}/allreduce")
    spec.charge(led, fab.layout.cores(axis), batch * tn, f"{name}/allreduce")
    return out


# ----------------------------------------------------------------------------------------------
# Analytic estimate (closed form, no emulation)
# ----------------------------------------------------------------------------------------------

def estimate_meshgemv(m: int, n: int, mesh_shape: tuple[int, int], device: Device | None = None,
                      input_axis: str = "y", spec: AllreduceSpec = KTREE, batch: int = 1,
                      ledger: Ledger | None = None, name: str = "meshgemv") -> Ledger:
    """The ledger :func:`meshgemv` would write for ``[batch, m] @ [m, n]``, without running it."""
    led = ledger if ledger is not None else Ledger(device) if device else Ledger()
    py, px = mesh_shape
    axis = _in_axis(input_axis)
    tm = ceil_div(m, (py, px)[axis])
    tn = ceil_div(n, (px, py)[axis])
    led.charge(f"{name}/local", local_cost(batch, tm, tn))
    led.memory(name, memory_words(batch, tm, tn))
    spec.charge(led, (py, px)[axis], batch * tn, f"{name}/allreduce")
    return led
