"""The aggregated mover: tiles tracked by identity, each rank's products as whole GEMMs.

Moves are worked out once per layout and key (:class:`~meshrt.movers.tracked.LineSchedule`,
kept in :attr:`meshrt.fabric.Fabric.plans`) and replayed on every call: only the tiles whose
path crosses a rank boundary are copied, in exactly the neighbour messages the exact mover
sends (same peers, sizes and names; posted without blocking, so in another order), and the
rank keeps every tile that passed through it. Products are formed at the end from those tiles
(:func:`~meshrt.movers.stored.stored_product`; dist-GEMM-T's chain reduces then pass the
carries the wafer's chains pass across rank boundaries). A K-tree allreduce joins each rank's
partial in one sweep per direction. Layouts as in :mod:`meshrt.movers`.
"""

from __future__ import annotations

import numpy as np

from ..collectives import line_allreduce
from ..fabric import HI, LO
from ..ops.estimate import gemm_t_segments
from . import LineTiles, Mover, Product, register_mover
from .stored import stored_product
from .tracked import LineSchedule, TrackedLines


class _Recording:
    """The moves of one key: its schedule and the messages of every move worked out so far."""

    def __init__(self, schedule: LineSchedule):
        self.schedule = schedule
        self.moves: list[list] = []


class TrackedOperand(LineTiles):
    """Tiles moved by identity: the ``i``-th move replays the ``i``-th recorded move of the
    key (working it out on the first call); :attr:`tiles` holds what passed through."""

    def __init__(self, fab, block, axis, line, ids, key, name):
        rec = fab.plans.get(("tracked",) + key)
        if rec is None:
            rec = fab.plans[("tracked",) + key] = _Recording(LineSchedule(axis, line, ids()))
        self.rec, self.done, self.prefix = rec, 0, name + "/"
        self.tiles = TrackedLines(fab, block, axis, line, schedule=rec.schedule)

    def _play(self, work_out) -> None:
        if self.done == len(self.rec.moves):  # the schedule stands where this move starts
            self.rec.moves.append(work_out(self.rec.schedule))
        self.tiles.play(self.rec.moves[self.done], self.prefix)
        self.done += 1

    def skew(self, amounts, kind, op="skew"):
        self._play(lambda s: s.shift_lines_back(amounts, kind, op=op))

    def permute(self, dest, op="shift"):
        self._play(lambda s: s.permute(dest, op=op))


def _row_labels(labels: np.ndarray) -> list:
    """``[(virtual rows, labels [bx, n, G])]``: one entry when every row of cores has the same
    labels (as :func:`meshrt.ops.grouped.label_tiles` lays them out), else one per row."""
    if (labels == labels[:1]).all():
        return [(slice(None), labels[0])]
    return [(slice(y, y + 1), labels[y]) for y in range(labels.shape[0])]


class StoredShiftProduct(Product):
    """``sum_k A[r, k] @ B[k, c]`` from the tiles the rank held, at the end."""

    def __init__(self, a: TrackedOperand, b: TrackedOperand, labels):
        self.a, self.b, self.labels = a, b, labels

    def step(self, t):
        pass  # every product is formed from the held tiles in result()

    def result(self):
        b_held, b_ids = self.b.tiles.held()
        a_store = self.a.tiles.complete()
        if self.labels is None:
            return stored_product(a_store, b_held, b_ids=b_ids)
        by, groups = self.labels.shape[0], self.labels.shape[3]
        per = a_store.shape[0] // by  # logical rows per virtual row
        parts = []
        for rows, lab in _row_labels(self.labels):
            sl = slice(None) if rows == slice(None) else slice(rows.start * per, rows.stop * per)
            col_groups = lab.reshape(-1, groups).astype(np.float32, copy=False)
            parts.append(stored_product(a_store[sl], b_held, col_groups, b_ids=b_ids))
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)


class TrackedReducedProductT(Product):
    """dist-GEMM-T per group from the B rows the rank held: the rank's part of every row's
    partial over its feature columns is one GEMM per group, ``RP[r, n] = A[r, F_rank]
    B[n, F_rank]^T``; then each step's chain reduces pass along x the carries the wafer's
    chains pass across rank boundaries (lines whose root lies on the sender's side send
    nothing on the wafer; their slots in the message carry 0). B's shift messages all come
    before the reduce messages: the same messages, in another order."""

    def __init__(self, fab, a, b: TrackedOperand, labels, plan, name):
        self.fab, self.a, self.b, self.labels, self.plan, self.name = fab, a, b, labels, plan, name
        self.steps: list[int] = []

    def step(self, t):
        self.steps.append(t)

    def _partials(self) -> tuple[np.ndarray, np.ndarray]:
        """``(present, RP)``: the groups with features on this rank, and ``f32[Gp, by*rows,
        tmb, Nl, tnb]`` their partials of every logical row with every B segment."""
        fab, plan, a, labels = self.fab, self.plan, self.a, self.labels
        by, bx, rows = fab.layout.by, fab.layout.bx, plan.rows_per_core
        tmb, tnb, td, groups, nl = plan.tmb, plan.tnb, a.shape[3], labels.shape[3], plan.nl
        f32 = np.float32
        b_mat = self.b.tiles.complete().transpose(0, 2, 1, 3).reshape(nl * tnb, bx * td)
        a_mat = a.transpose(0, 2, 1, 3).reshape(by, rows * tmb, bx * td)  # [by, ., F_rank]
        pats = [
            (vrows, lab.reshape(bx * td, groups).astype(f32, copy=False))
            for vrows, lab in _row_labels(labels)
        ]
        present = np.flatnonzero(np.any([feat.any(axis=0) for _, feat in pats], axis=0))
        rp = np.zeros((len(present), by, rows * tmb, nl * tnb), f32)
        for vrows, feat in pats:
            a_rows = a_mat[vrows].reshape(-1, bx * td)
            for i, g in enumerate(present):
                f = np.flatnonzero(feat[:, g])
                if f.size:
                    prod = (a_rows[:, f] * feat[f, g]) @ b_mat[:, f].T
                    rp[i, vrows] = prod.reshape(rp[i, vrows].shape)
        return present, rp.reshape(len(present), by * rows, tmb, nl, tnb)

    def result(self):
        fab, plan = self.fab, self.plan
        lay = fab.layout
        by, bx, rows, cols = lay.by, lay.bx, plan.rows_per_core, plan.cols_per_core
        tmb, tnb, groups = plan.tmb, plan.tnb, self.labels.shape[3]
        f32 = np.float32
        present, rp = self._partials()
        c = np.zeros((by, bx, rows, tmb, cols, tnb, groups), f32)
        r, nr = fab.coords[1], lay.rx
        op = f"{self.name}/reduce"
        part = np.zeros((by, 1, tmb, groups, tnb), f32)  # the rank's partial per row
        every = len(present) == groups
        plans = _reduce_plan(fab, plan)
        for t in self.steps:
            for lrows, n_seg, up_mask, down_mask, mine, col, slot, s in plans[t]:
                picked = rp[:, lrows, :, n_seg].transpose(0, 2, 1, 3)  # [by, Gp, tmb, tnb]
                if every:
                    part[:, 0] = picked
                else:
                    part[:, 0][:, :, present] = picked
                below = above = None
                if 0 < r < nr - 1:
                    below = fab.recv(part.shape, f32, 1, LO, op=op)
                if r < nr - 1:  # up the chain, and the carry coming down, in one Sendrecv
                    carry = part if below is None else part + below
                    up = np.where(up_mask, carry, f32(0))
                    above = fab.exchange(up, 1, HI, op, part.shape)
                if r > 0:
                    carry = part if above is None else part + above
                    down = np.where(down_mask, carry, f32(0))
                    if r < nr - 1:
                        fab.send(down, 1, LO, op=op)
                    else:  # the top of the chain: what comes up and goes down, one Sendrecv
                        below = fab.exchange(down, 1, LO, op, part.shape, True)
                total = part
                if below is not None:
                    total = below + total
                if above is not None:
                    total = total + above
                c[mine, col, s, :, slot] = total[mine, 0].transpose(0, 1, 3, 2)
        return c.reshape(by, bx, rows * tmb, cols * tnb, groups)


def _reduce_plan(fab, plan) -> list:
    """Per step ``t``, per logical row ``s`` of a virtual core, the index arrays of
    :class:`TrackedReducedProductT`'s chain reduces on this rank, worked out once per layout:
    ``(lrows, n_seg, up_mask, down_mask, mine, col, slot, s)`` with ``lrows`` the rank's
    logical rows, ``n_seg`` the B segment each holds, the masks of the rows whose root lies
    above / below this rank (``[by, 1, 1, 1, 1]``), and the rows rooted here (``mine``) with
    their virtual column and slot."""
    lay = fab.layout
    rows, cols = plan.rows_per_core, plan.cols_per_core
    key = ("gemm_t_reduce", plan.nl, rows, cols)
    if key in fab.plans:
        return fab.plans[key]
    x0, x1 = fab.origin[1], fab.origin[1] + lay.bx
    vrows = fab.index(0)
    steps = []
    for t in range(plan.nl):
        seg = gemm_t_segments(plan, t)  # [Nl] per logical row
        step = []
        for s in range(rows):
            lrows = np.arange(lay.by) * rows + s  # the rank's logical rows
            n_seg = seg[vrows * rows + s]  # B segment held by each
            root = n_seg // cols
            shape = (lay.by, 1, 1, 1, 1)
            mine = np.flatnonzero((root >= x0) & (root < x1))
            step.append(
                (
                    lrows,
                    n_seg,
                    (root >= x1).reshape(shape),
                    (root < x0).reshape(shape),
                    mine,
                    root[mine] - x0,
                    n_seg[mine] % cols,
                    s,
                )
            )
        steps.append(step)
    fab.plans[key] = steps
    return steps


@register_mover
class AggregatedMover(Mover):
    """Tiles by identity, products per rank, one sweep per allreduce direction."""

    name = "aggregated"

    def lines(self, fab, block, axis, line, ids, key, name):
        return TrackedOperand(fab, block, axis, line, ids, key, name)

    def shift_product(self, a, b, labels=None):
        assert isinstance(a, TrackedOperand) and isinstance(b, TrackedOperand)
        return StoredShiftProduct(a, b, labels)

    def reduced_product_t(self, a, b, labels, plan, name):
        assert isinstance(b, TrackedOperand)
        return TrackedReducedProductT(b.tiles.fab, a, b, labels, plan, name)

    def allreduce(self, fab, block, axis, op, phases, name):
        return line_allreduce(fab, block, axis, op, name)
