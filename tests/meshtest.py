"""Helpers for tests that run on any number of ranks."""
from __future__ import annotations

import numpy as np

from meshrt.fabric import Fabric
from meshrt.mesh import MeshLayout, divisors


def world():
    """``COMM_WORLD`` (size 1 in a serial run)."""
    from mpi4py import MPI
    return MPI.COMM_WORLD


def rank_grids(size: int):
    """Every ``(ry, rx)`` with ``ry * rx == size``."""
    return [(d, size // d) for d in divisors(size)]


def layouts(size: int, blocks=((1, 1), (2, 3), (3, 2), (4, 4))):
    """Layouts for ``size`` ranks: each rank grid with several blocks of cores per rank."""
    out = []
    for ry, rx in rank_grids(size):
        for by, bx in blocks:
            out.append(MeshLayout(ry * by, rx * bx, ry, rx))
    return out


def fabric(layout: MeshLayout, trace: bool = True, **kw) -> Fabric:
    comm = world()
    return Fabric(comm if comm.Get_size() > 1 else None, layout, trace=trace, **kw)


def core_ids(fab: Fabric, extra=()) -> np.ndarray:
    """A block whose tile at core (py, px) holds its global id ``py * Px + px``."""
    ys = fab.index(0)[:, None]
    xs = fab.index(1)[None, :]
    ids = (ys * fab.layout.px + xs).astype(np.float64)
    shape = ids.shape + tuple(extra)
    return np.broadcast_to(ids.reshape(ids.shape + (1,) * len(extra)), shape).copy()


def assert_neighbour_only(fab: Fabric) -> None:
    """Every data-plane message went to or came from a Cartesian neighbour."""
    allowed = fab.neighbour_ranks()
    peers = {r.peer for r in fab.trace}
    assert peers <= allowed, f"rank {fab.rank} talked to {peers - allowed}, neighbours {allowed}"


def greedy_steps(model, logits, steps: int):
    """Greedy decoding from ``logits``: the picked ids and each step's logits on the host."""
    ids, step_logits = [], []
    for _ in range(steps):
        ids.append(model.pick(logits))
        logits = model.decode(ids[-1])
        step_logits.append(model.logits_to_host(logits))
    return ids, np.array(step_logits)
