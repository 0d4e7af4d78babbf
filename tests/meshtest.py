"""Helpers for tests that run on any number of ranks."""

from __future__ import annotations

import numpy as np
import pytest

from meshrt.fabric import Fabric
from meshrt.mesh import MeshLayout, divisors
from meshrt.runtime import ControlPlane


def world():
    """``COMM_WORLD`` (size 1 in a serial run)."""
    from mpi4py import MPI

    return MPI.COMM_WORLD


def control_plane() -> ControlPlane:
    """The ranks of this run (one process, no MPI, in a serial run)."""
    comm = world()
    return ControlPlane(comm if comm.Get_size() > 1 else None)


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


def layout_id(lay: MeshLayout) -> str:
    """A short test id: ``4x6-on-2x2`` is a 4x6 virtual mesh on a 2x2 rank grid."""
    return f"{lay.py}x{lay.px}-on-{lay.ry}x{lay.rx}"


def as_params(lays) -> list:
    """Layouts as pytest parameters named by :func:`layout_id`, so a failing layout is named in
    the report and the others still run."""
    return [pytest.param(lay, id=layout_id(lay)) for lay in lays]


def layout_params(blocks=((1, 1), (2, 3), (3, 2), (4, 4))) -> list:
    """:func:`layouts` for this run's ranks, as pytest parameters (:func:`as_params`)."""
    return as_params(layouts(world().Get_size(), blocks))
