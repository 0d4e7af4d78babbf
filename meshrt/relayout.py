"""Re-laying out data between two distributions of the same mesh, through the data plane.

When prefill and decode use different virtual meshes (or different splits of a sequence), items
(tokens, feature columns) must move from the cores that hold them to the cores that need them.
Along one axis the items keep their order, so each rank's share is a contiguous range before and
after; :func:`rebalance` moves the ranges with one upward and one downward sweep of neighbour
messages, relaying items that travel further than one rank. Two calls, one per axis, re-lay a 2-D
matrix. :func:`move_cost` prices what the wafer does: every item walks from its source core to its
destination core, all links at once. :func:`fetch_rows` delivers scattered items (a table lookup,
e.g. embedding rows) to arbitrary slots of the same line, priced by :func:`fetch_cost`.
"""

from __future__ import annotations

import numpy as np

from .fabric import HI, LO, Fabric
from .plmr import Cost


def bounds_from_counts(counts) -> np.ndarray:
    """``[0, c0, c0+c1, ...]``: item range boundaries of consecutive holders."""
    return np.concatenate([[0], np.cumsum(np.asarray(counts, dtype=np.int64))])


def rank_bounds(core_counts, ranks: int) -> np.ndarray:
    """Item boundaries per rank of a line whose cores hold ``core_counts`` items each."""
    core = bounds_from_counts(core_counts)
    per = (len(core) - 1) // ranks
    return core[::per]


def _take(a: np.ndarray, axis: int, lo: int, hi: int) -> np.ndarray:
    sl = [slice(None)] * a.ndim
    sl[axis] = slice(lo, hi)
    return a[tuple(sl)]


def rebalance(
    fab: Fabric,
    data: np.ndarray,
    axis: int,
    item_axis: int,
    src_bounds,
    dst_bounds,
    name: str = "rebalance",
) -> np.ndarray:
    """Move items between the ranks of each rank line along ``axis``.

    Parameters
    ----------
    data : ndarray
        This rank's items ``[src_bounds[r], src_bounds[r+1])`` along ``item_axis`` (``r`` is the
        rank's index along ``axis``); other dimensions equal on every rank.
    src_bounds, dst_bounds : sequence of int
        Item boundaries per rank (length ``R + 1``, non-decreasing, equal totals).

    Returns
    -------
    ndarray
        Items ``[dst_bounds[r], dst_bounds[r+1])``, in order.
    """
    src = np.asarray(src_bounds, dtype=np.int64)
    dst = np.asarray(dst_bounds, dtype=np.int64)
    r, nr = fab.coords[axis], fab.layout.ranks(axis)
    if len(src) != nr + 1 or len(dst) != nr + 1 or src[-1] != dst[-1] or src[0] != dst[0]:
        raise ValueError(f"bounds must have {nr + 1} entries with equal ends: {src}, {dst}")
    if data.shape[item_axis] != src[r + 1] - src[r]:
        raise ValueError(
            f"rank holds {data.shape[item_axis]} items, bounds say {src[r + 1] - src[r]}"
        )
    held, lo = data, int(src[r])

    def shape_of(count):
        s = list(data.shape)
        s[item_axis] = count
        return tuple(s)

    # upward sweep: items [dst[b], src[b]) cross boundary b from rank b-1 to rank b
    if r > 0 and dst[r] < src[r]:
        got = fab.recv(shape_of(src[r] - dst[r]), data.dtype, axis, LO, op=name)
        held, lo = np.concatenate([got, held], axis=item_axis), int(dst[r])
    if r < nr - 1 and dst[r + 1] < src[r + 1]:
        fab.send(_take(held, item_axis, dst[r + 1] - lo, src[r + 1] - lo), axis, HI, op=name)
    # downward sweep: items [src[b], dst[b]) cross boundary b from rank b to rank b-1
    if r < nr - 1 and src[r + 1] < dst[r + 1]:
        got = fab.recv(shape_of(dst[r + 1] - src[r + 1]), data.dtype, axis, HI, op=name)
        held = np.concatenate([held, got], axis=item_axis)
    if r > 0 and src[r] < dst[r]:
        fab.send(_take(held, item_axis, src[r] - lo, dst[r] - lo), axis, LO, op=name)
    return np.ascontiguousarray(_take(held, item_axis, dst[r] - lo, dst[r + 1] - lo))


def move_cost(src_core_counts, dst_core_counts, words_per_item: float) -> Cost:
    """Wafer cost of re-distributing ordered items along a line of cores.

    Item ``i`` walks from the core holding it to the core that will; all walk at once. The
    critical path is the longest walk (``hops``) plus the busiest link's stream (``words``).
    """
    src = bounds_from_counts(src_core_counts)
    dst = bounds_from_counts(dst_core_counts)
    total = int(src[-1])
    if total == 0:
        return Cost(routes=2)
    items = np.arange(total)
    src_core = np.searchsorted(src, items, side="right") - 1
    dst_core = np.searchsorted(dst, items, side="right") - 1
    hops = int(np.abs(src_core - dst_core).max())
    flow = np.abs(src[1:-1] - dst[1:-1]).max() if len(src) > 2 else 0  # items across a boundary
    return Cost(words=float(flow * words_per_item), hops=hops, routes=2)


# ----------------------------------------------------------------------------------------------
# Fetching scattered items along a line (a table lookup through the data plane)
# ----------------------------------------------------------------------------------------------


def fetch_cost(src_core, dst_core, n_cores: int, words_per_item: float) -> Cost:
    """Wafer cost of :func:`fetch_rows`: every item walks from its source core to its
    destination core along the line, all at once. ``hops`` is the longest walk, ``words`` the
    busiest link's stream (items crossing one core boundary in one direction)."""
    src = np.asarray(src_core, dtype=np.int64)
    dst = np.asarray(dst_core, dtype=np.int64)
    if src.size == 0:
        return Cost(routes=2)
    hops = int(np.abs(src - dst).max())
    load = 0
    for lo, hi in ((src, dst), (dst, src)):  # upward, then downward movers
        m = lo < hi
        cover = np.zeros(n_cores + 1, dtype=np.int64)  # cut c lies between cores c-1 and c
        np.add.at(cover, lo[m] + 1, 1)
        np.add.at(cover, hi[m] + 1, -1)
        load = max(load, int(np.cumsum(cover).max(initial=0)))
    return Cost(words=float(load * words_per_item), hops=hops, routes=2)


def fetch_rows(
    fab: Fabric,
    table: np.ndarray,
    axis: int,
    src_core,
    src_slot,
    dst_core,
    dst_slot,
    n_slots: int,
    record: bool = True,
    name: str = "fetch",
) -> np.ndarray:
    """Deliver items of per-core tables to slots of other cores of the same line.

    Item ``k`` is slot ``src_slot[k]`` of the table on core ``src_core[k]`` (global index along
    ``axis``); it lands in slot ``dst_slot[k]`` of core ``dst_core[k]`` of the same line, in every
    line at once. Items travel neighbour to neighbour (one upward and one downward sweep of
    messages across rank boundaries); the same item may be fetched to several places.

    Parameters
    ----------
    table : ndarray
        ``[by, bx, R, *item]``: each core's table of ``R`` items.
    src_core, src_slot, dst_core, dst_slot : int arrays of one length
        The same on every rank.
    n_slots : int
        Slots per core of the result.

    Returns
    -------
    ndarray
        ``[by, bx, n_slots, *item]``; slots no item lands in are zero.
    """
    src_core, src_slot, dst_core, dst_slot = (
        np.asarray(v, dtype=np.int64).ravel() for v in (src_core, src_slot, dst_core, dst_slot)
    )
    n = fab.layout.cores(axis)
    if record:
        words = int(np.prod(table.shape[3:], dtype=np.int64))
        fab.ledger.charge(name, fetch_cost(src_core, dst_core, n, words))
    tab = table if axis == 0 else np.swapaxes(table, 0, 1)  # [cores along axis, other, R, ...]
    b = tab.shape[0]
    lo = fab.origin[axis]
    hi = lo + b
    out = np.zeros((b, tab.shape[1], n_slots) + tab.shape[3:], dtype=table.dtype)
    got: dict[int, np.ndarray] = {}  # item -> [other, *item]

    def local(k):
        return tab[k_src_local[k], :, src_slot[k]]

    k_src_local = src_core - lo
    for upward in (True, False):
        side = HI if upward else LO
        cut_in, cut_out = (lo, hi) if upward else (hi, lo)

        def crossing(cut, upward=upward):
            if upward:
                return np.flatnonzero((src_core < cut) & (dst_core >= cut))
            return np.flatnonzero((src_core >= cut) & (dst_core < cut))

        if 0 < cut_in < n:
            ids = crossing(cut_in)
            if len(ids):
                slab = fab.recv(
                    (len(ids),) + tab.shape[1:2] + tab.shape[3:], table.dtype, axis, -side, op=name
                )
                assert slab is not None  # the cut is inside the line: a neighbour exists
                got.update(zip(ids.tolist(), slab))
        if 0 < cut_out < n:
            ids = crossing(cut_out)
            if len(ids):
                parts = [local(k) if lo <= src_core[k] < hi else got[k] for k in ids.tolist()]
                fab.send(np.stack(parts), axis, side, op=name)
    mine = np.flatnonzero((dst_core >= lo) & (dst_core < hi))
    here = mine[(src_core[mine] >= lo) & (src_core[mine] < hi)]
    if len(here):
        out[dst_core[here] - lo, :, dst_slot[here]] = tab[src_core[here] - lo, :, src_slot[here]]
    for k in np.setdiff1d(mine, here).tolist():
        out[dst_core[k] - lo, :, dst_slot[k]] = got[k]
    return out if axis == 0 else np.swapaxes(out, 0, 1)
