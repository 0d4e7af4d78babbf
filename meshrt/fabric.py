"""The fabric: the only place where algorithm data crosses MPI ranks.

A :class:`Fabric` is built once from a communicator and a :class:`~meshrt.mesh.MeshLayout` and
passed explicitly to every kernel. It moves tiles between *virtual cores*; a rank's share of a
distributed array is one ndarray ``block`` of shape ``(by, bx, *tile)``. Moving data ``k`` cores
along an axis moves the whole block with numpy and sends only the ``k``-core edge slab to the
Cartesian neighbour rank, with buffer-based ``Sendrecv``. A transfer longer than a rank's block
is relayed rank by rank, as the wafer relays it core by core. No other MPI peer is ever used for
algorithm data; a tracing mode records every peer and byte count so tests can prove it.

Pricing (hops, routing stages, words) is the caller's job: the fabric knows how data moves
through MPI, the algorithm knows what the wafer would do (pass-through vs. relay).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .mesh import MeshError, MeshLayout, ring_next, ring_prev
from .movers import Mover, mover_of
from .plmr import Ledger
from .runtime import Comm, ControlPlane

LO, HI = -1, +1


@dataclass(frozen=True)
class TraceRecord:
    """One data-plane MPI message seen from the sending or receiving rank."""

    op: str
    peer: int
    nbytes: int
    sent: bool


class Fabric:
    """Neighbour-only data movement over an MPI Cartesian grid of ranks.

    Parameters
    ----------
    comm : ControlPlane, mpi4py.MPI.Comm or None
        The ranks, whose number must equal ``layout.nranks``. ``None`` means one process, no
        MPI. Rank ``r`` sits at ``ControlPlane.coords`` of the rank grid (row-major).
    layout : MeshLayout
        Virtual mesh and rank grid.
    ledger : Ledger, optional
        Where kernels record the modeled wafer cost; a WSE-2 ledger by default.
    trace : bool
        Record every data-plane message in :attr:`trace`.
    mover : str or Mover, optional
        How kernels emulate their data movement (:mod:`meshrt.movers`), chosen once for the
        fabric: ``"exact"`` (every phase its own messages, every core its own products) or
        ``"aggregated"`` (tiles tracked by identity, each rank's products as whole GEMMs, the
        K-tree allreduce in one sweep per direction: the same neighbour messages but the
        K-tree's, the same ledger). Default :data:`meshrt.movers.DEFAULT_EMULATION`.
    """

    _peers: dict[tuple[int, int], int | None]  # (axis, side) -> neighbour rank or None

    def __init__(
        self,
        comm: ControlPlane | Comm | None,
        layout: MeshLayout,
        *,
        ledger: Ledger | None = None,
        trace: bool = False,
        mover: str | Mover | None = None,
    ):
        self.control = ControlPlane.of(comm)
        size = self.control.size
        if size != layout.nranks:
            raise MeshError(
                f"rank grid {layout.ry}x{layout.rx} needs {layout.nranks} ranks but "
                f"{size} are running (start with mpiexec -n {layout.nranks})"
            )
        comm = self.control.comm
        self.world = comm
        self.layout = layout
        self.ledger = ledger if ledger is not None else Ledger()
        self.trace: list[TraceRecord] | None = [] if trace else None
        self.mover = mover_of(mover)
        # index plans the collectives and kernels work out once for this layout and rank
        self.plans: dict = {}
        self._mpi = None
        if size == 1:
            self.cart = None
            self.rank = 0
            self.coords = (0, 0)
            self._peers = {(a, s): None for a in (0, 1) for s in (LO, HI)}
        else:
            from mpi4py import MPI

            self._mpi = MPI
            self.cart = self.control.communicator.Create_cart(
                [layout.ry, layout.rx], periods=[False, False], reorder=False
            )
            self.rank = self.cart.Get_rank()  # == world rank: the grid is not reordered
            self.coords = self.control.coords((layout.ry, layout.rx))
            self._peers = {}
            for axis in (0, 1):
                src, dst = self.cart.Shift(axis, 1)
                self._peers[(axis, LO)] = None if src == MPI.PROC_NULL else src
                self._peers[(axis, HI)] = None if dst == MPI.PROC_NULL else dst
        self.origin = layout.origin(self.coords)

    # -- geometry --------------------------------------------------------------------------
    @property
    def by(self) -> int:
        return self.layout.by

    @property
    def bx(self) -> int:
        return self.layout.bx

    @property
    def nranks(self) -> int:
        return self.layout.nranks

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def index(self, axis: int) -> np.ndarray:
        """Global indices of this rank's virtual cores along ``axis``."""
        b = self.layout.block(axis)
        return np.arange(self.origin[axis], self.origin[axis] + b)

    def peer(self, axis: int, side: int) -> int | None:
        """Rank of the Cartesian neighbour on ``side`` (``LO``/``HI``) of ``axis``, or ``None``."""
        return self._peers[(axis, side)]

    def neighbour_ranks(self) -> set[int]:
        """All Cartesian neighbour ranks of this rank."""
        return {p for p in self._peers.values() if p is not None}

    # -- raw neighbour messages ------------------------------------------------------------
    def _note(self, op: str, peer, nbytes: int, sent: bool) -> None:
        if self.trace is not None and peer is not None:
            self.trace.append(TraceRecord(op, int(peer), int(nbytes), sent))

    def send(self, array: np.ndarray, axis: int, side: int, op: str = "send") -> None:
        """Blocking send of ``array`` to the neighbour on ``side`` of ``axis`` (no-op at an
        edge)."""
        peer = self.peer(axis, side)
        if peer is None:
            return
        buf = np.ascontiguousarray(array)
        assert self.cart is not None  # a peer exists only on a grid of several ranks
        self.cart.Send(buf, dest=peer, tag=axis)
        self._note(op, peer, buf.nbytes, True)

    def recv(self, shape, dtype, axis: int, side: int, op: str = "recv") -> np.ndarray | None:
        """Blocking receive from the neighbour on ``side`` of ``axis``; ``None`` at an edge."""
        peer = self.peer(axis, side)
        if peer is None:
            return None
        buf = np.empty(shape, dtype=dtype)
        assert self.cart is not None
        self.cart.Recv(buf, source=peer, tag=axis)
        self._note(op, peer, buf.nbytes, False)
        return buf

    def isend(self, array: np.ndarray, axis: int, side: int, op: str = "send"):
        """Non-blocking :meth:`send`: returns ``(request, buffer)`` (``None`` at an edge); the
        message is the one :meth:`send` would send, complete it with :meth:`wait_all`."""
        peer = self.peer(axis, side)
        if peer is None:
            return None
        buf = np.ascontiguousarray(array)
        assert self.cart is not None
        req = self.cart.Isend(buf, dest=peer, tag=axis)
        self._note(op, peer, buf.nbytes, True)
        return req, buf

    def irecv(self, shape, dtype, axis: int, side: int, op: str = "recv"):
        """Non-blocking :meth:`recv`: returns ``(request, buffer)`` (``None`` at an edge); the
        buffer holds the message once the request completed (``request.Wait()``)."""
        peer = self.peer(axis, side)
        if peer is None:
            return None
        buf = np.empty(shape, dtype=dtype)
        assert self.cart is not None
        req = self.cart.Irecv(buf, source=peer, tag=axis)
        self._note(op, peer, buf.nbytes, False)
        return req, buf

    def wait_all(self, requests: list) -> None:
        """Complete the requests of :meth:`isend` / :meth:`irecv`."""
        if requests:
            assert self._mpi is not None
            self._mpi.Request.Waitall(requests)

    def exchange(
        self,
        array: np.ndarray,
        axis: int,
        side: int,
        op: str = "exchange",
        shape=None,
        recv_first: bool = False,
    ) -> np.ndarray | None:
        """Send ``array`` to the neighbour on ``side`` of ``axis`` and receive the neighbour's
        array (``shape``: its shape, when it is not ``array``'s; same dtype) in one
        ``Sendrecv``: the two messages a caller would otherwise send and receive one after the
        other (``recv_first`` names that order in the trace). ``None`` at an edge."""
        peer = self.peer(axis, side)
        if peer is None:
            return None
        assert self.cart is not None
        buf = np.ascontiguousarray(array)
        out = np.empty(buf.shape if shape is None else shape, dtype=buf.dtype)
        self.cart.Sendrecv(buf, dest=peer, sendtag=axis, recvbuf=out, source=peer, recvtag=axis)
        if recv_first:
            self._note(op, peer, out.nbytes, False)
        self._note(op, peer, buf.nbytes, True)
        if not recv_first:
            self._note(op, peer, out.nbytes, False)
        return out

    def pass_on(
        self, array: np.ndarray, axis: int, to_side: int, op: str = "pass_on"
    ) -> np.ndarray | None:
        """Send ``array`` to the neighbour on ``to_side`` and receive the same-shaped array from
        the neighbour on the opposite side, in one ``Sendrecv`` (one step of a relay). Returns
        ``None`` where that neighbour does not exist.
        """
        dst = self.peer(axis, to_side)
        src = self.peer(axis, -to_side)
        if dst is None and src is None:
            return None
        assert self.cart is not None and self._mpi is not None
        PROC_NULL = self._mpi.PROC_NULL
        buf = np.ascontiguousarray(array)
        out = np.empty_like(buf)
        self.cart.Sendrecv(
            buf,
            dest=PROC_NULL if dst is None else dst,
            sendtag=axis,
            recvbuf=out,
            source=PROC_NULL if src is None else src,
            recvtag=axis,
        )
        self._note(op, dst, buf.nbytes, True)
        self._note(op, src, buf.nbytes, False)
        return out if src is not None else None

    # -- block movement --------------------------------------------------------------------
    def halo(
        self, block: np.ndarray, axis: int, lo: int, hi: int, fill=0, op: str = "halo"
    ) -> np.ndarray:
        """Extend ``block`` along ``axis`` with ``lo`` cores from below and ``hi`` from above.

        Cores beyond the edge of the virtual mesh are ``fill``. A halo wider than the rank's block
        is relayed: each round forwards what the previous round brought in. Collective along
        ``axis``: every rank of a rank line must call it with the same widths.

        Returns
        -------
        ndarray
            Shape ``block.shape`` with ``lo + b + hi`` along ``axis``.
        """
        parts = []
        if lo:
            parts.append(self._gather_side(block, axis, lo, LO, fill, op))
        parts.append(block)
        if hi:
            parts.append(self._gather_side(block, axis, hi, HI, fill, op))
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=axis)

    def _gather_side(self, block, axis, width, side, fill, op):
        """The ``width`` cores adjacent to this block on ``side``, relayed rank by rank."""
        b = block.shape[axis]
        got = []  # pieces in order of increasing distance from this block
        piece = block  # what this rank forwards in the next round
        need = width
        while need > 0:
            take = min(need, b)
            # The piece nearest the receiver: its high end if it is sent upwards (receiver HI of us
            # means we are on its LO side, so it wants our highest cores), else its low end.
            sl = [slice(None)] * block.ndim
            sl[axis] = slice(b - take, b) if side == LO else slice(0, take)
            outgoing = piece[tuple(sl)]
            if self.cart is None:
                recv = None
            else:
                recv = self.pass_on(outgoing, axis, to_side=-side, op=op)
            if recv is None:
                shape = list(block.shape)
                shape[axis] = take
                recv = np.full(shape, fill, dtype=block.dtype)
            got.append(recv)
            need -= take
            piece = recv  # only forwarded again when it was a whole block (take == b)
        if side == LO:
            got = got[::-1]
        return got[0] if len(got) == 1 else np.concatenate(got, axis=axis)

    def shift(
        self,
        block: np.ndarray,
        axis: int,
        disp: int,
        fill=0,
        op: str = "shift",
    ) -> np.ndarray:
        """Every core takes the tile of the core ``disp`` before it: ``out[i] = in[i - disp]``.

        Cores with no source (within ``|disp|`` of the mesh edge) get ``fill``.
        """
        if disp == 0:
            return block
        b = block.shape[axis]
        ext = self.halo(block, axis, disp if disp > 0 else 0, -disp if disp < 0 else 0, fill, op)
        sl = [slice(None)] * block.ndim
        sl[axis] = slice(0, b) if disp > 0 else slice(-disp, -disp + b)
        return ext[tuple(sl)]

    def ring_shift(
        self, block: np.ndarray, axis: int, reverse: bool = False, op: str = "ring_shift"
    ) -> np.ndarray:
        """One step of the interleaved two-hop ring along ``axis``.

        Forward: core ``i`` takes the tile of its ring predecessor ``prev(i)``; ``reverse`` takes
        the successor's. Every source is at most two cores away, so this is a two-core halo
        exchange plus a local gather.
        """
        n = self.layout.cores(axis)
        if n == 1:
            return block
        src = ring_next(n) if reverse else ring_prev(n)
        idx = self.index(axis)
        w = min(2, n - 1)  # every rank takes part in both exchanges, edge ranks too
        b = block.shape[axis]
        below = self._gather_side(block, axis, w, LO, 0, op)  # cores idx[0]-w .. idx[0]-1
        above = self._gather_side(block, axis, w, HI, 0, op)  # cores idx[-1]+1 .. idx[-1]+w
        local = src[idx] - idx[0]
        out = np.empty_like(block)
        pos = np.arange(b)
        inside = (local >= 0) & (local < b)
        for d in np.unique(local[inside] - pos[inside]):  # a few strided copies, not a gather
            _copy_strided(out, block, pos[inside & (local - pos == d)], int(d), axis)
        for j in np.flatnonzero(~inside):  # at most 2w cores near the edges
            dst: list = [slice(None)] * block.ndim
            dst[axis] = j
            srcsl = [slice(None)] * block.ndim
            srcsl[axis] = local[j] + w if local[j] < 0 else local[j] - b
            out[tuple(dst)] = (below if local[j] < 0 else above)[tuple(srcsl)]
        return out


def _copy_strided(out: np.ndarray, block: np.ndarray, dst: np.ndarray, offset: int, axis: int):
    """``out[dst] = block[dst + offset]`` along ``axis``, as one slice copy per arithmetic run."""
    runs: list[list[int]] = []
    for p in dst.tolist():
        if runs and (len(runs[-1]) == 1 or p - runs[-1][-1] == runs[-1][1] - runs[-1][0]):
            runs[-1].append(p)
        else:
            runs.append([p])
    for run in runs:
        step = int(run[1] - run[0]) if len(run) > 1 else 1
        lo, hi = int(run[0]), int(run[-1]) + 1
        o = [slice(None)] * block.ndim
        i = [slice(None)] * block.ndim
        o[axis] = slice(lo, hi, step)
        i[axis] = slice(lo + offset, hi + offset, step)
        out[tuple(o)] = block[tuple(i)]
