"""Moving tiles along the lines of the mesh: rings, cyclic shifts and their wafer cost.

A *line* is a row (``axis=1``) or a column (``axis=0``) of cores. Kernels that emulate a logical
mesh finer than the virtual one (the ``lcm`` partition of non-square meshes) give every virtual
core ``refine`` consecutive logical cores of the line; :func:`line_of` describes which logical
cores this rank owns.

:func:`permute_line` moves every tile of a line at once, ``out[dest[i]] = block[i]``, as the wafer
does in one lockstep step: each rank passes across each of its two rank boundaries exactly the
tiles whose path crosses that boundary, relaying tiles that travel further. Messages go to the
Cartesian neighbours only, through the fabric's ``send``/``recv``; a rank receives before it
sends, so every pass is one chain of neighbour messages and cannot deadlock. Output buffers can be
preallocated (the wafer's double buffers), so a step allocates nothing of the block's size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..fabric import HI, LO, Fabric
from ..mesh import ring_next, ring_pos, ring_prev

RING_KINDS = ("interleaved", "linear")


@dataclass(frozen=True)
class Line:
    """This rank's share of a line of ``n`` logical cores: cores ``lo .. lo + size - 1``."""

    n: int
    lo: int
    size: int

    @property
    def hi(self) -> int:
        return self.lo + self.size


def line_of(fab: Fabric, axis: int, refine: int = 1) -> Line:
    """The line along ``axis`` when every virtual core holds ``refine`` logical cores of it."""
    return Line(
        fab.layout.cores(axis) * refine, fab.origin[axis] * refine, fab.layout.block(axis) * refine
    )


def ring_dest(n: int, kind: str = "interleaved", reverse: bool = False) -> np.ndarray:
    """``dest[i]``: the core that core ``i`` sends its tile to in one ring step.

    ``interleaved`` is MeshGEMM's two-hop ring (``0 -> 2 -> 4 ... -> 3 -> 1 -> 0``); ``linear`` is
    Cannon's ring ``0 -> 1 -> ... -> n-1 -> 0`` whose closing edge spans the whole line.
    """
    if kind == "interleaved":
        return ring_prev(n) if reverse else ring_next(n)
    if kind == "linear":
        i = np.arange(n)
        return (i - 1) % n if reverse else (i + 1) % n
    raise ValueError(f"unknown ring {kind!r}; use one of {RING_KINDS}")


def ring_positions(n: int, kind: str = "interleaved") -> np.ndarray:
    """Position of each core on the ring (``pos[i]``; the ring starts at core 0)."""
    if kind == "interleaved":
        return ring_pos(n)
    if kind == "linear":
        return np.arange(n)
    raise ValueError(f"unknown ring {kind!r}; use one of {RING_KINDS}")


def crossing(dest: np.ndarray, cut: int, upward: bool) -> np.ndarray:
    """Sources whose tile crosses the boundary between cores ``cut - 1`` and ``cut``.

    ``upward`` selects tiles moving toward higher indices. Sorted by source index.
    """
    i = np.arange(len(dest))
    if upward:
        return i[(i < cut) & (dest >= cut)]
    return i[(i >= cut) & (dest < cut)]


def cut_crossings(dest: np.ndarray, line: Line):
    """The messages of one :func:`permute_line` step at this rank's edges, in message order.

    Yields ``(receive, side, src)``: receive from the neighbour at ``-side``, or send to the
    one at ``side``, the tiles of sources ``src`` (sorted) that cross that edge. Per side (HI,
    then LO) the receive comes first, so a tile passing through the rank is in hand before it
    is forwarded. Nothing when the rank holds the whole line.
    """
    n, lo, hi = line.n, line.lo, line.hi
    if lo == 0 and hi == n:
        return
    for side in (HI, LO):
        upward = side == HI
        in_cut, out_cut = (lo, hi) if upward else (hi, lo)
        for receive, cut in ((True, in_cut), (False, out_cut)):
            if 0 < cut < n:
                src = crossing(dest, cut, upward)
                if len(src):
                    yield receive, side, src


# ----------------------------------------------------------------------------------------------
# Wafer cost of one permutation step
# ----------------------------------------------------------------------------------------------


def physical_hops(dest: np.ndarray, refine: int = 1) -> int:
    """Physical hops of the longest edge when every virtual core holds ``refine`` logical cores."""
    i = np.arange(len(dest))
    return int(np.max(np.abs(dest // refine - i // refine))) if len(dest) else 0


def physical_load(dest: np.ndarray, refine: int = 1) -> int:
    """Most logical tiles crossing one physical link in one direction during one step."""
    n = len(dest)
    i = np.arange(n)
    worst = 0
    for upward in (True, False):
        lo, hi = (i, dest) if upward else (dest, i)
        # a tile moving from lo to hi crosses every cut c with lo < c <= hi
        cover = np.zeros(n + 1, dtype=np.int64)
        m = lo < hi
        np.add.at(cover, lo[m] + 1, 1)
        np.add.at(cover, hi[m] + 1, -1)
        per_cut = np.cumsum(cover)[:n]
        cuts = np.arange(refine, n, refine)  # the physical boundaries
        if len(cuts):
            worst = max(worst, int(per_cut[cuts].max()))
    return worst


# ----------------------------------------------------------------------------------------------
# Emulation
# ----------------------------------------------------------------------------------------------


def _at(ndim: int, axis: int, k: int, width: int = 1) -> tuple:
    sl = [slice(None)] * ndim
    sl[axis] = slice(k, k + width)
    return tuple(sl)


def permute_line(
    fab: Fabric,
    block: np.ndarray,
    axis: int,
    dest: np.ndarray,
    line: Line,
    out: np.ndarray | None = None,
    op: str = "permute_line",
) -> np.ndarray:
    """Every logical core ``i`` of every line along ``axis`` sends its tile to ``dest[i]``.

    Parameters
    ----------
    block : ndarray
        ``[..., line.size (at axis), ...]``: this rank's cores of each line; the other leading
        axis enumerates lines and moves along unchanged.
    dest : ndarray
        A permutation of ``range(line.n)`` (the same on every rank of the line).
    out : ndarray, optional
        Preallocated result (may be a strided view); must not overlap ``block``.

    Returns
    -------
    ndarray
        ``out`` with ``out[dest[i]] = block[i]`` along ``axis``. Collective along ``axis``: every
        rank of a rank line must call it with the same ``dest`` and the same number of lines.
    """
    n, lo, hi = line.n, line.lo, line.hi
    src = np.empty(n, dtype=np.int64)
    src[dest] = np.arange(n)
    local = src[lo:hi] - lo
    if out is None:
        out = np.empty_like(block)
    np.take(block, np.clip(local, 0, line.size - 1), axis=axis, out=out, mode="clip")
    if lo == 0 and hi == n:
        return out
    got: dict[int, np.ndarray] = {}
    nd = block.ndim
    for receive, side, ids in cut_crossings(dest, line):
        if receive:
            shape = list(block.shape)
            shape[axis] = len(ids)
            slab = fab.recv(tuple(shape), block.dtype, axis, -side, op=op)
            assert slab is not None  # the cut is inside the line: a neighbour exists
            for k, i in enumerate(ids):
                got[int(i)] = slab[_at(nd, axis, k)]
        else:
            parts = [
                block[_at(nd, axis, int(i) - lo)] if lo <= i < hi else got[int(i)] for i in ids
            ]
            fab.send(
                parts[0] if len(parts) == 1 else np.concatenate(parts, axis=axis),
                axis,
                side,
                op=op,
            )
    for j in np.nonzero((local < 0) | (local >= line.size))[0]:
        out[_at(nd, axis, int(j))] = got[int(src[lo + j])]
    return out


def back_shift_rounds(n: int, amounts, kind: str = "interleaved") -> tuple:
    """The rounds in which lines move back ``amounts[l]`` ring positions on an ``n``-ring.

    Each line takes the shorter way round: ``a`` reverse ring steps or ``n - a`` forward ones
    (forward on a tie), one ring step per round.

    Returns
    -------
    order : ndarray
        The lines sorted so that the lines still moving in round ``r`` are a prefix of each
        direction group (forward first).
    rounds : int
        Rounds until every line has arrived.
    groups : tuple of (start, steps, dest)
        Per direction (forward, then reverse): its first position in ``order``, the ring steps
        of its lines in that order, and the ring's destination map.
    """
    amounts = np.asarray(amounts) % n
    forward_steps = (n - amounts) % n
    reverse = amounts < forward_steps
    steps = np.where(reverse, amounts, forward_steps)
    order = np.lexsort((-steps, reverse))
    steps_sorted = steps[order]
    n_fwd = int(np.count_nonzero(~reverse[order]))
    groups = (
        (0, steps_sorted[:n_fwd], ring_dest(n, kind)),
        (n_fwd, steps_sorted[n_fwd:], ring_dest(n, kind, reverse=True)),
    )
    return order, int(steps.max()) if steps.size else 0, groups


def shift_lines_back(
    fab: Fabric,
    block: np.ndarray,
    axis: int,
    line: Line,
    amounts: np.ndarray,
    kind: str = "interleaved",
    op: str = "skew",
) -> np.ndarray:
    """Move line ``l`` of ``block`` back ``amounts[l]`` ring positions along ``axis``.

    ``amounts`` has one entry per line of the block (the block's other leading axis). Each line
    takes the shorter way round: ``a`` reverse ring steps or ``n - a`` forward ones (forward on a
    tie), one ring step per round. Returns a new array; ``block`` is not modified.
    """
    other = 1 - axis
    order, rounds, groups = back_shift_rounds(line.n, amounts, kind)
    cur = np.take(block, order, axis=other)
    buf = np.empty_like(cur)
    for r in range(rounds):
        for start, group_steps, dest in groups:
            count = int(np.count_nonzero(group_steps > r))
            if count:
                sl = _at(block.ndim, other, start, count)
                permute_line(fab, cur[sl], axis, dest, line, out=buf[sl], op=op)
                cur[sl] = buf[sl]
    result = np.empty_like(cur)
    idx: list = [slice(None)] * block.ndim
    idx[other] = order
    result[tuple(idx)] = cur
    return result
