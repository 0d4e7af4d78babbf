"""Host I/O: whole tiled arrays scattered from the host to the mesh and gathered back.

Not a distributed array type: functions that move a global array of tiles, shape
``(Py, Px, *tile)``, between the host (rank ``root``, default 0) and the ranks, each of which
holds the block ``tiles[y0:y0+by, x0:x0+bx]`` of shape ``(by, bx, *tile)``. With several ranks
they go through the fabric's control plane (``bcast`` of the shape, then ``Scatter``, ``Gather``
or ``Allgather`` of equal blocks in rank order on its communicator); that is allowed because
they model the wafer's host I/O, not core-to-core traffic, and the ledger prices them as edge
I/O. One rank copies.
"""

from __future__ import annotations

import numpy as np

from .fabric import Fabric
from .mesh import from_tiles, to_tiles


def _edge_links(fabric: Fabric) -> int:
    lay = fabric.layout
    return 2 * (lay.py + lay.px)


def local_block(fabric: Fabric, tiles: np.ndarray) -> np.ndarray:
    """This rank's block of a global tile array that every rank already holds (no messages)."""
    y0, x0 = fabric.origin
    return tiles[y0 : y0 + fabric.by, x0 : x0 + fabric.bx]


def _rank_blocks(fabric: Fabric, tiles: np.ndarray):
    """Global tiles split into per-rank blocks, in rank order (row-major over the rank grid)."""
    lay = fabric.layout
    t = tiles.reshape(lay.ry, lay.by, lay.rx, lay.bx, *tiles.shape[2:])
    return np.ascontiguousarray(np.moveaxis(t, 2, 1))  # (ry, rx, by, bx, *tile)


def host_shapes(fabric: Fabric, *arrays: np.ndarray | None, root: int = 0) -> list:
    """The shapes of ``root``'s host arrays on every rank (other ranks may pass ``None``)."""
    return fabric.control.bcast([None if x is None else tuple(x.shape) for x in arrays], root=root)


def scatter(fabric: Fabric, tiles: np.ndarray | None, root: int = 0) -> np.ndarray:
    """Distribute a global ``(Py, Px, *tile)`` tile array held by ``root``.

    Returns this rank's ``(by, bx, *tile)`` block. Non-root ranks pass ``None``.
    """
    control = fabric.control
    if fabric.nranks == 1:
        out = np.array(tiles, copy=True)
    else:
        meta = control.bcast(None if tiles is None else (tiles.shape, tiles.dtype.str), root)
        if meta is None:  # the same on every rank
            raise ValueError(f"scatter: the root rank {root} passed no tiles")
        shape, dtype = meta
        lay = fabric.layout
        block_shape = (lay.by, lay.bx, *shape[2:])
        out = np.empty(block_shape, dtype=np.dtype(dtype))
        send = _rank_blocks(fabric, tiles) if tiles is not None and control.rank == root else None
        # reorder=False in the Cartesian grid keeps rank order == row-major rank coordinates
        control.communicator.Scatter(send, out, root=root)
    fabric.ledger.io(out.nbytes * fabric.nranks, _edge_links(fabric))
    return out


def gather(
    fabric: Fabric,
    block: np.ndarray,
    root: int = 0,
    to_all: bool = False,
    record: bool = True,
) -> np.ndarray | None:
    """Collect every rank's ``(by, bx, *tile)`` block into the global tile array on ``root``
    (on every rank with ``to_all``). Other ranks get ``None``. ``record=False``: the caller
    prices the transfer."""
    lay = fabric.layout
    block = np.ascontiguousarray(block)
    if record:
        fabric.ledger.io(block.nbytes * fabric.nranks, _edge_links(fabric))
    if fabric.nranks == 1:
        return block.copy()
    comm = fabric.control.communicator
    receives = to_all or fabric.control.rank == root
    recv = np.empty((lay.ry, lay.rx) + block.shape, block.dtype) if receives else None
    if to_all:
        comm.Allgather(block, recv)
    else:
        comm.Gather(block, recv, root=root)
    if recv is None:
        return None
    t = np.moveaxis(recv, 1, 2)  # (ry, by, rx, bx, *tile)
    return t.reshape(lay.py, lay.px, *block.shape[2:])


def scatter_matrix(
    fabric: Fabric, a: np.ndarray | None, tile: tuple[int, int] | None = None, root: int = 0
) -> np.ndarray:
    """Tile a global ``(M, N)`` matrix (zero-padded) and distribute it from ``root``.

    Returns ``(by, bx, tm, tn)``.
    """
    lay = fabric.layout
    tiles = to_tiles(a, (lay.py, lay.px), tile) if a is not None else None
    return scatter(fabric, tiles, root)


def gather_matrix(
    fabric: Fabric,
    block: np.ndarray,
    shape: tuple[int, int] | None = None,
    root: int = 0,
    to_all: bool = False,
    record: bool = True,
) -> np.ndarray | None:
    """Assemble ``(by, bx, tm, tn)`` blocks into the global matrix, cropped to ``shape``
    (``record``: as :func:`gather`)."""
    tiles = gather(fabric, block, root, to_all, record)
    return None if tiles is None else from_tiles(tiles, shape)
