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

import functools
import math

import numpy as np

from ..collectives import KTREE, AllreduceSpec, allreduce
from ..fabric import Fabric
from ..mesh import Axis, X, Y, ceil_div, pad_to
from ..plmr import Cost, Device, Ledger
from ..precision import is_words, widen


def _in_axis(input_axis: Axis | str) -> Axis:
    try:
        return Axis.of(input_axis)
    except ValueError:
        raise ValueError(f"input_axis must be 'y' or 'x', not {input_axis!r}") from None


def gemv_tile(m: int, n: int, mesh_shape: tuple[int, int], input_axis: Axis | str) -> tuple:
    """The weight tile ``(rows, cols)`` one core holds of ``W[m, n]`` for :func:`meshgemv`:
    the input (``m``) is cut along ``input_axis``, the output (``n``) along the other axis,
    each rounded up. The one statement of the GEMV's tile arithmetic."""
    axis = _in_axis(input_axis)
    return ceil_div(m, mesh_shape[axis]), ceil_div(n, mesh_shape[axis.other])


def weight_tiles(
    w: np.ndarray, mesh_shape: tuple[int, int], input_axis: Axis | str = Y, dtype=np.float32
) -> np.ndarray:
    """Host-side placement of ``W[M, N]`` for :func:`meshgemv`.

    Returns
    -------
    ndarray
        ``input_axis="y"``: ``tiles[py, px] = W[in-seg py, out-seg px]``,
        ``f32[Py, Px, M/Py, N/Px]``.
        ``input_axis="x"``: ``tiles[py, px] = W[in-seg px, out-seg py]``,
        ``f32[Py, Px, M/Px, N/Py]``.
        Segments are zero-padded, so padding never changes a result.
    """
    axis = _in_axis(input_axis)
    m, n = w.shape
    tm, tn = gemv_tile(m, n, mesh_shape, axis)
    n_in, n_out = mesh_shape[axis], mesh_shape[axis.other]
    t = pad_to(w.astype(dtype, copy=False), (n_in * tm, n_out * tn)).reshape(n_in, tm, n_out, tn)
    return np.ascontiguousarray(t.transpose((0, 2, 1, 3) if axis == Y else (2, 0, 1, 3)))


def vector_tiles(x: np.ndarray, mesh_shape: tuple[int, int], axis: Axis | str = Y) -> np.ndarray:
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


def vector_from_tiles(tiles: np.ndarray, length: int, axis: Axis | str) -> np.ndarray:
    """Inverse of :func:`vector_tiles` (reads one replica): ``[*batch, length]``."""
    line = tiles[:, 0] if _in_axis(axis) == Y else tiles[0, :]
    v = np.moveaxis(line, 0, -2)
    return v.reshape(v.shape[:-2] + (-1,))[..., :length]


#: f32 elements of the buffer that 16-bit weights are widened into, a few core rows at a time
#: (small enough to stay in cache between widening and multiplying).
WIDEN_ELEMENTS = 1 << 18


def _gemv_f32(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    if x.ndim == 3:
        if w.shape[2] * w.shape[3] < 300:  # tiny tiles: one loop in einsum beats BLAS calls
            return np.einsum("abk,abkn->abn", x, w, optimize=False)
        return np.matmul(x[:, :, None, :], w)[:, :, 0, :]
    return np.matmul(x, w[:, :, None] if x.ndim > 4 else w)


def stream_layout(w: np.ndarray, input_axis: Axis | str = Y) -> np.ndarray:
    """The tiles of ``w`` (``[by, bx, K, N]``, as :func:`weight_tiles` places them), stored so
    that one matrix-vector product covers a whole line of cores (:func:`local_gemv`).

    A Y-vector input is the same on every core of a core row, so the row's ``bx`` tiles are
    stored as one row-major ``[K, bx * N]`` matrix (memory ``[by, K, bx, N]``); an X-vector
    input is the same down a core column: memory ``[bx, K, by, N]``. Returns a view of that
    memory with ``w``'s shape and values: indexing is unchanged, only a line's products are
    one streaming pass instead of one per core.
    """
    by, bx, k, n = w.shape
    if _in_axis(input_axis) == Y:
        out = np.empty((by, k, bx, n), w.dtype).transpose(0, 2, 1, 3)
    else:
        out = np.empty((bx, k, by, n), w.dtype).transpose(2, 0, 1, 3)
    out[...] = w
    return out


def _line_gemv(x: np.ndarray, w: np.ndarray, axis: Axis) -> np.ndarray | None:
    """``x @ w`` per core as one product per line of cores when ``w``'s memory allows it
    (:func:`stream_layout`, or tiles stored transposed as a tied LM head's are); ``None`` when
    it does not. ``x``: ``f32[by, bx, K]``, the same along the lines (``axis`` is the input's)."""
    by, bx, k, n = w.shape
    if x.ndim == 4:
        return _line_gemm(x, w, axis)
    if axis == Y:
        t = w.transpose(0, 2, 1, 3)  # [by, K, bx, N]
        if t.flags.c_contiguous:
            return np.matmul(x[:, 0, None, :], t.reshape(by, k, bx * n)).reshape(by, bx, n)
        t = w.swapaxes(2, 3)  # [by, bx, N, K]: each tile transposed
        if t.flags.c_contiguous:
            return np.matmul(t.reshape(by, bx * n, k), x[:, 0, :, None]).reshape(by, bx, n)
        return None
    t = w.transpose(1, 2, 0, 3)  # [bx, K, by, N]
    if t.flags.c_contiguous:
        r = np.matmul(x[0, :, None, :], t.reshape(bx, k, by * n))
        return r.reshape(bx, by, n).transpose(1, 0, 2)
    return None


def _line_gemm(x: np.ndarray, w: np.ndarray, axis: Axis) -> np.ndarray | None:
    """:func:`_line_gemv` of ``B`` vectors ``x``: ``f32[by, bx, B, K]`` -> ``f32[by, bx, B, N]``,
    one ``[B, K] x [K, line * N]`` product per line of cores (the weights stream once for all
    ``B`` vectors)."""
    by, bx, k, n = w.shape
    b = x.shape[2]
    if axis == Y:
        t = w.transpose(0, 2, 1, 3)  # [by, K, bx, N]
        if t.flags.c_contiguous:
            r = np.matmul(x[:, 0], t.reshape(by, k, bx * n))  # [by, B, bx * N]
            return r.reshape(by, b, bx, n).transpose(0, 2, 1, 3)
        t = w.swapaxes(2, 3)  # [by, bx, N, K]: each tile transposed
        if t.flags.c_contiguous:
            r = np.matmul(t.reshape(by, bx * n, k), x[:, 0].swapaxes(1, 2))  # [by, bx * N, B]
            return r.reshape(by, bx, n, b).swapaxes(2, 3)
        return None
    t = w.transpose(1, 2, 0, 3)  # [bx, K, by, N]
    if t.flags.c_contiguous:
        r = np.matmul(x[0], t.reshape(bx, k, by * n))  # [bx, B, by * N]
        return r.reshape(bx, b, by, n).transpose(2, 0, 1, 3)
    return None


def local_gemv(x: np.ndarray, w: np.ndarray, input_axis: Axis | str | None = None) -> np.ndarray:
    """Every core's partial ``x_tile @ w_tile``: ``f32[by, bx, *batch, K] x [by, bx, K, N]``.

    ``w`` may hold 16-bit storage words (:mod:`meshrt.precision`); they are widened to float32
    a few core rows at a time into one small buffer, as a core widens its 16-bit weights, so
    no float32 copy of the weights is ever made. With ``input_axis`` (``x`` is then a Y- or
    X-vector, the same along its lines) float32 weights in :func:`stream_layout` memory are
    multiplied a line of cores at a time.
    """
    x = x.astype(np.float32, copy=False)
    if not is_words(w):
        w = w.astype(np.float32, copy=False)
        if input_axis is not None and x.ndim in (3, 4) and w.shape[2] * w.shape[3] >= 300:
            out = _line_gemv(x, w, _in_axis(input_axis))
            if out is not None:
                return out
        return _gemv_f32(x, w)
    by = w.shape[0]
    rows = max(1, WIDEN_ELEMENTS // max(1, math.prod(w.shape[1:])))
    buf = np.empty((min(rows, by),) + w.shape[1:], np.float32)
    out = None
    for a0 in range(0, by, rows):
        a1 = min(by, a0 + rows)
        part = _gemv_f32(x[a0:a1], widen(w[a0:a1], out=buf[: a1 - a0]))
        if out is None:
            out = np.empty((by,) + part.shape[1:], np.float32)
        out[a0:a1] = part
    assert out is not None  # by >= 1
    return out


@functools.lru_cache(maxsize=1024)
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


def meshgemv(
    fab: Fabric,
    x: np.ndarray,
    w: np.ndarray,
    input_axis: Axis | str = Y,
    spec: AllreduceSpec = KTREE,
    name: str = "meshgemv",
    record: bool = True,
) -> np.ndarray:
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
    record : bool
        Write the ledger records (:func:`charge_meshgemv` for the block's tile); ``False``:
        only compute (a caller that prices the op itself).

    Returns
    -------
    ndarray
        The other orientation: an X-vector ``f32[by, bx, *batch, N/Px]`` for a Y-vector input,
        a Y-vector ``f32[by, bx, *batch, N/Py]`` for an X-vector input.
    """
    axis = _in_axis(input_axis)
    if x.shape[-1] != w.shape[2]:
        raise ValueError(
            f"vector segment {x.shape[-1]} does not match weight tile rows "
            f"{w.shape[2]} (input_axis={input_axis!r})"
        )
    if record:
        tile = w.shape[2], w.shape[3]
        cores = fab.layout.cores(axis)
        charge_meshgemv(fab.ledger, name, tile, cores, spec, math.prod(x.shape[2:-1]))
    part = local_gemv(x, w, input_axis)
    return allreduce(fab, part, axis, "sum", spec, record=False, name=f"{name}/allreduce")


def charge_meshgemv(
    led: Ledger, name: str, tile: tuple, cores: int, spec: AllreduceSpec, batch: int = 1
) -> None:
    """Write the records of a MeshGEMV of ``batch`` vectors on weight tiles ``(rows, cols)``
    whose partial products are allreduced over ``cores``: the local products, the memory per
    core and the allreduce. The kernel and the estimator charge this, and only this."""
    tm, tn = tile
    with led.running(name):
        led.charge(f"{name}/local", local_cost(batch, tm, tn))
        led.memory(name, memory_words(batch, tm, tn))
        spec.charge(led, cores, batch * tn, f"{name}/allreduce")


# ----------------------------------------------------------------------------------------------
# Analytic estimate (closed form, no emulation)
# ----------------------------------------------------------------------------------------------


def estimate_meshgemv(
    m: int,
    n: int,
    mesh_shape: tuple[int, int],
    device: Device | None = None,
    input_axis: Axis | str = Y,
    spec: AllreduceSpec = KTREE,
    batch: int = 1,
    ledger: Ledger | None = None,
    name: str = "meshgemv",
) -> Ledger:
    """The ledger :func:`meshgemv` would write for ``[batch, m] @ [m, n]``, without running it."""
    led = ledger if ledger is not None else Ledger(device) if device else Ledger()
    axis = _in_axis(input_axis)
    tile = gemv_tile(m, n, mesh_shape, axis)
    charge_meshgemv(led, name, tile, mesh_shape[axis], spec, batch)
    return led


# ----------------------------------------------------------------------------------------------
# Host side, streamed: one rank's block straight from a reader, piece by piece
# ----------------------------------------------------------------------------------------------

#: f32 elements a streaming placer asks its reader for at once (about 32 MB).
CHUNK_ELEMENTS = 8 << 20


def core_chunks(n: int, per_core: int) -> list[tuple[int, int]]:
    """Ranges ``[c0, c1)`` of ``n`` cores whose pieces (``per_core`` elements each) stay near
    :data:`CHUNK_ELEMENTS`."""
    step = max(1, CHUNK_ELEMENTS // max(1, per_core))
    return [(c, min(n, c + step)) for c in range(0, n, step)]


def weight_region(
    get,
    shape: tuple[int, int],
    mesh_shape: tuple[int, int],
    input_axis: Axis | str,
    origin: tuple[int, int],
    block: tuple[int, int],
    storage: str = "float32",
    reader_rows: str = "out",
) -> np.ndarray:
    """Cores ``origin .. origin + block`` of :func:`weight_tiles`, built piece by piece.

    Parameters
    ----------
    get : callable
        ``get(rows, cols) -> f32[len(rows), len(cols)]``: entries of the (already padded)
        ``W[M, N]``, for index arrays of rows and columns.
    shape : (int, int)
        ``(M, N)``, each divisible by the mesh side it is cut by.
    origin, block : (int, int)
        First core ``(py, px)`` and number of cores ``(by, bx)`` to make.
    storage : str
        Word type of the result (:func:`meshrt.precision.word_dtype`).
    reader_rows : {"out", "in"}
        Which index the reader reads fastest in contiguous runs (an HF linear is stored
        ``[out, in]``, an embedding table ``[vocab, hidden]``); pieces follow it.

    Returns
    -------
    ndarray
        ``[by, bx, M/Py, N/Px]`` (``input_axis="y"``) or ``[by, bx, M/Px, N/Py]`` (``"x"``); no
        global array is ever built.
    """
    from ..precision import to_words, word_dtype

    y0, x0 = origin
    by, bx = block
    axis = _in_axis(input_axis)
    # in-segments follow core rows for a Y input, core columns for an X input
    tm, tn = gemv_tile(shape[0], shape[1], mesh_shape, axis)
    out = np.empty((by, bx, tm, tn), word_dtype(storage))
    in_cores, out_cores = ((by, y0), (bx, x0)) if axis == Y else ((bx, x0), (by, y0))
    # pieces run over the cores of the reader's fast index; the other index is taken whole
    along_out = reader_rows == "out"
    n_along = out_cores[0] if along_out else in_cores[0]
    per_core = (tn * in_cores[0] * tm) if along_out else (tm * out_cores[0] * tn)
    for c0, c1 in core_chunks(n_along, per_core):
        if along_out:
            rows = np.arange(in_cores[1] * tm, (in_cores[1] + in_cores[0]) * tm)
            cols = np.arange((out_cores[1] + c0) * tn, (out_cores[1] + c1) * tn)
        else:
            rows = np.arange((in_cores[1] + c0) * tm, (in_cores[1] + c1) * tm)
            cols = np.arange(out_cores[1] * tn, (out_cores[1] + out_cores[0]) * tn)
        piece = get(rows, cols)  # f32[len(rows), len(cols)]
        t = to_words(piece, storage).reshape(len(rows) // tm, tm, len(cols) // tn, tn)
        t = t.transpose(0, 2, 1, 3)  # [in cores, out cores, tm, tn]
        if axis == X:
            t = t.transpose(1, 0, 2, 3)  # [out cores (rows), in cores]
        if axis == Y:
            dst = np.s_[:, c0:c1] if along_out else np.s_[c0:c1, :]
        else:
            dst = np.s_[c0:c1, :] if along_out else np.s_[:, c0:c1]
        out[dst] = t
    return out
