"""The rank's products of a shift GEMM, from the tiles it held (the aggregated mover).

Over MeshGEMM's ``Nl`` steps logical core ``(r, c)`` multiplies ``A[r, k] @ B[k, c]`` for every
K segment ``k``; a rank that kept every tile that passed through it (by identity,
:class:`meshrt.movers.tracked.TrackedLines`) computes the same sums as a few GEMMs.
"""

from __future__ import annotations

import numpy as np

from ..precision import widen


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
        (:meth:`meshrt.movers.tracked.TrackedLines.held`); by default ``i``.

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
