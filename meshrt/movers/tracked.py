"""Tiles moving along lines, tracked by identity (the aggregated mover's bookkeeping).

A kernel whose operand tiles only move (MeshGEMM's and Cannon's A and B, the grouped kernels'
rotating operand) need not move them core by core: every tile has an identity (the operand
block it carries), a :class:`LineSchedule` works out once per layout which identities sit at
which cores after each move and which tiles cross a rank boundary, and a :class:`TrackedLines`
replays only those crossings, as exactly the neighbour messages :func:`meshrt.ops._lines.
permute_line` and :func:`meshrt.ops._lines.shift_lines_back` send (same peers, shapes and
order), posted without blocking. The rank then holds every tile that passed through it, by
identity, and computes its products as whole GEMMs.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from ..fabric import Fabric
from ..ops._lines import Line, back_shift_rounds, cut_crossings


@dataclass(frozen=True)
class TileMessage:
    """One neighbour message of a tracked move (:class:`LineSchedule`).

    ``send``: this rank sends (else receives) the tiles at :attr:`where` of the identity store,
    to / from the neighbour on ``side`` of the lines' axis. :attr:`where` indexes the store as
    ``store[where] -> [lines, tiles, *tile]``; the message itself is ``[lines, tiles, *tile]``
    along x (``axis=1``) and ``[tiles, lines, *tile]`` along y. ``shape`` is its leading shape.
    Receives are numbered (``index``) in schedule order; a send names the last receive whose
    tiles it forwards (``after``; -1: only tiles the rank held from the start).
    """

    send: bool
    side: int
    where: tuple
    shape: tuple
    op: str
    index: int = -1  # a receive's number in its schedule
    after: int = -1  # a send carries tiles that receive ``after`` (and none later) brought


class LineSchedule:
    """The identity bookkeeping of tiles moving along lines, without their data.

    Every tile of a line has an identity ``0 .. n-1`` (the operand block it carries, e.g. its
    K segment), and every line holds each identity once. A move relabels the cores (identities
    ``ids[:, perm]``, one small permutation per step) and lists the neighbour messages that
    carry the tiles whose path crosses a rank boundary, exactly those :func:`permute_line` and
    :func:`shift_lines_back` send (same peers, shapes and order). A schedule depends on the
    layout only, so kernels work it out once per layout (:attr:`meshrt.fabric.Fabric.plans`)
    and replay it on every call (:class:`TrackedLines`).

    Parameters
    ----------
    axis : int
        Axis of the lines (0: columns of cores, 1: rows of cores).
    line : Line
        This rank's share of every line.
    ids : ndarray
        ``int[lines, line.n]``: identity of the tile at every logical core of every line.

    Attributes
    ----------
    initial_ids : ndarray
        ``ids`` at the start.
    present : ndarray
        ``bool[lines, line.n]``: the identities this rank has held so far.
    """

    def __init__(self, axis: int, line: Line, ids: np.ndarray):
        self.axis, self.line = axis, line
        self.ids = np.array(ids, dtype=np.int64)
        self.initial_ids = self.ids.copy()
        self.present = np.zeros(self.ids.shape, bool)
        lines = np.arange(self.ids.shape[0])[:, None]
        self.present[lines, self.ids[:, line.lo : line.hi]] = True
        self.arrival = np.full(self.ids.shape, -1)  # the receive that brought each tile
        self.receives = 0
        self.perm = np.arange(line.n)  # the tiles now at the cores: ids[:, perm]

    @property
    def local(self) -> bool:
        """The whole line is on this rank: moves only relabel, no tile ever arrives."""
        return self.line.lo == 0 and self.line.hi == self.line.n

    @property
    def complete(self) -> bool:
        """Every tile of every line has passed through this rank."""
        return bool(self.present.all())

    def _where(self, lines: np.ndarray, ids: np.ndarray) -> tuple:
        lines = lines[:, None]
        return (lines, ids) if self.axis == 1 else (ids, lines)

    def _exchange(self, dest: np.ndarray, lines: np.ndarray, now, op: str) -> list:
        """The neighbour messages of one :func:`permute_line` step of ``lines`` (in message
        order); ``now(src)`` gives the identities at cores ``src`` of those lines."""
        moves: list[TileMessage] = []
        for receive, side, src in cut_crossings(dest, self.line):
            ids = now(src)
            where = self._where(lines, ids)
            if receive:
                shape = (len(lines), len(src)) if self.axis == 1 else (len(src), len(lines))
                moves.append(TileMessage(False, -side, where, shape, op, self.receives))
                self.present[lines[:, None], ids] = True
                self.arrival[lines[:, None], ids] = self.receives
                self.receives += 1
            else:
                if not self.present[lines[:, None], ids].all():
                    raise RuntimeError(
                        "aggregated emulation: a tile would leave a rank it never reached"
                    )
                after = int(self.arrival[lines[:, None], ids].max())
                moves.append(TileMessage(True, side, where, (), op, after=after))
        return moves

    def permute(self, dest: np.ndarray, op: str = "permute_line") -> list:
        """One :func:`permute_line` step (``out[dest[i]] = in[i]``) of every line; returns its
        messages."""
        n = self.line.n
        lines = np.arange(self.ids.shape[0])
        moves = self._exchange(dest, lines, lambda src: self.ids[:, self.perm[src]], op)
        inv = np.empty(n, dtype=np.int64)
        inv[dest] = np.arange(n)
        self.perm = self.perm[inv]
        return moves

    def shift_lines_back(
        self, amounts: np.ndarray, kind: str = "interleaved", op: str = "skew"
    ) -> list:
        """:func:`shift_lines_back`: line ``l`` moves back ``amounts[l]`` ring positions, in
        the same rounds; returns the messages."""
        n = self.line.n
        self.ids = self.ids[:, self.perm]
        self.perm = np.arange(n)
        order, rounds, directions = back_shift_rounds(n, amounts, kind)
        groups = []
        for start, group_steps, dest in directions:
            inv = np.empty(n, dtype=np.int64)
            inv[dest] = np.arange(n)
            groups.append((start, group_steps, dest, inv))
        moved = [np.arange(n), np.arange(n)]  # each group's composed permutation
        final = self.ids.copy()
        moves: list[TileMessage] = []
        for r in range(rounds):
            for gi, (start, group_steps, dest, inv) in enumerate(groups):
                count = int(np.count_nonzero(group_steps > r))
                if count:
                    lines = order[start : start + count]
                    moves += self._exchange(
                        dest,
                        lines,
                        lambda src, lines=lines, m=moved[gi]: self.ids[
                            lines[:, None], m[src][None, :]
                        ],
                        op,
                    )
                    moved[gi] = moved[gi][inv]
                    done = lines[group_steps[:count] == r + 1]  # lines whose last round this is
                    final[done] = self.ids[done][:, moved[gi]]
        self.ids = final
        return moves


class TrackedLines:
    """Read-only tiles moving along lines, emulated by identity (aggregated emulation).

    :attr:`store` keeps every tile this rank has held so far, by identity; the moves of a
    :class:`LineSchedule` copy only the tiles whose path crosses a rank boundary, in exactly
    the neighbour messages :func:`permute_line` and :func:`shift_lines_back` send, so the
    trace is the same. A tile that has not reached this rank can never be sent or used:
    :meth:`complete` checks that every tile passed through before a kernel computes with them.

    Parameters
    ----------
    block : ndarray
        This rank's tiles ``[..., line.size (at axis), ...]``; the other leading axis enumerates
        the rank's lines (as :func:`permute_line`). Not modified.
    axis : int
        Axis of the lines (0: columns of cores, 1: rows of cores).
    line : Line
        This rank's share of every line.
    ids : ndarray, optional
        ``int[lines, line.n]``: identity of the tile at every logical core of every line.
    schedule : LineSchedule, optional
        A schedule worked out beforehand (instead of ``ids``): its moves are replayed with
        :meth:`play`, and :meth:`complete` checks its final presence.

    Attributes
    ----------
    store : ndarray
        Like ``block`` with the line axis extended to ``line.n`` and indexed by identity (the
        block itself when it already is: natural tiles of a rank-local line).
    """

    def __init__(
        self,
        fab: Fabric,
        block: np.ndarray,
        axis: int,
        line: Line,
        ids: np.ndarray | None = None,
        schedule: LineSchedule | None = None,
    ):
        self.fab, self.axis, self.line = fab, axis, line
        if schedule is None:
            if ids is None:
                raise ValueError("TrackedLines needs the tiles' ids or a schedule")
            schedule = LineSchedule(axis, line, ids)
        self.schedule = schedule
        self.store: np.ndarray | None
        self._recvs: deque = deque()  # (number, request, buffer, where) posted receives
        self._sends: deque = deque()  # (request, buffer) posted sends
        self._pending = 0  # bytes of the posted receives
        self._sending = 0  # bytes of the posted sends
        self.block = block
        self.tile = block.shape[2:]
        home = self.schedule.initial_ids[:, line.lo : line.hi]
        natural = bool((home == np.arange(line.lo, line.hi)).all())
        self._relabelled = self.schedule.local and not natural
        if self.schedule.local and natural:
            self.store = block
            return
        if self._relabelled:  # the store is made only if asked for (see held())
            self.store = None
            return
        shape = list(block.shape)
        shape[axis] = line.n
        self.store = np.empty(shape, block.dtype)
        if natural:  # one slice copy
            where = [slice(None)] * block.ndim
            where[axis] = slice(line.lo, line.hi)
            self.store[tuple(where)] = block
        else:
            lines = np.arange(home.shape[0])[:, None]
            at = (lines, home) if axis == 1 else (home, lines)
            self.store[at] = block if axis == 1 else np.swapaxes(block, 0, 1)

    def play(self, moves: list, prefix: str = "") -> None:
        """Post the sends and receives of ``moves`` (:class:`TileMessage`, in order; message
        names ``prefix + move.op``) without waiting, except that a send first puts in the
        store the receives whose tiles it forwards. :meth:`complete` finishes them all."""
        if not moves:
            return
        fab, axis, store = self.fab, self.axis, self.store
        assert store is not None  # only lines across ranks move tiles, and they have a store
        for m in moves:
            if m.send:
                self._settle(m.after)
                tiles = store[m.where]
                sent = fab.isend(
                    tiles if axis == 1 else np.swapaxes(tiles, 0, 1), axis, m.side, prefix + m.op
                )
                assert sent is not None  # 0 < cut < n: a neighbour
                self._sends.append(sent)
                self._sending += sent[1].nbytes
                while self._sending > self.PENDING_BYTES:  # the oldest sends completed first
                    req, buf = self._sends.popleft()
                    req.Wait()
                    self._sending -= buf.nbytes
            else:
                got = fab.irecv(m.shape + self.tile, store.dtype, axis, m.side, prefix + m.op)
                assert got is not None
                self._recvs.append((m.index, got[0], got[1], m.where))
                self._pending += got[1].nbytes
                if self._pending > self.PENDING_BYTES:
                    self._settle(self._recvs[0][0])

    #: bytes of receive (and of send) buffers in flight before the oldest are completed
    PENDING_BYTES = 64 << 20

    def _settle(self, upto: int) -> None:
        """Wait for the posted receives up to number ``upto`` and put their tiles in the
        store."""
        while self._recvs and self._recvs[0][0] <= upto:
            _, req, buf, where = self._recvs.popleft()
            req.Wait()
            assert self.store is not None
            self.store[where] = buf if self.axis == 1 else np.swapaxes(buf, 0, 1)
            self._pending -= buf.nbytes

    def finish(self) -> None:
        """Complete every posted message (receives stored)."""
        if self._recvs:
            self._settle(self._recvs[-1][0])
        self.fab.wait_all([req for req, _ in self._sends])
        self._sends.clear()
        self._sending = 0

    def complete(self) -> np.ndarray:
        """:attr:`store` once every tile of every line has passed through this rank."""
        if not self.schedule.complete:
            raise RuntimeError("aggregated emulation: some tiles never reached this rank")
        self.finish()
        if self.store is None:  # a rank-local line: the block's tiles put in identity order
            lines = np.arange(self.schedule.initial_ids.shape[0])[:, None]
            rows = np.argsort(self.schedule.initial_ids, axis=1)  # core of each identity
            at = (lines, rows) if self.axis == 1 else (rows, lines)
            tiles = self.block[at]  # [lines, n, *tile]
            self.store = tiles if self.axis == 1 else np.swapaxes(tiles, 0, 1)
        return self.store

    def held(self) -> tuple[np.ndarray, np.ndarray | None]:
        """The tiles as they are held: ``(store, None)``, the store by identity
        (:meth:`complete`); or, on a rank-local line whose tiles were never put in identity
        order, ``(block, ids)``: core ``i`` of line ``l`` of ``block`` holds identity
        ``ids[l, i]`` (``int[lines, line.n]``), so a kernel can read the tiles where they are.
        """
        if self._relabelled and self.store is None:
            return self.block, self.schedule.initial_ids
        return self.complete(), None
