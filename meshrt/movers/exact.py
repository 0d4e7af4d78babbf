"""The exact mover: every phase its own neighbour messages, every core its own products.

Tiles move core by core (:func:`meshrt.ops._lines.permute_line` and
:func:`meshrt.ops._lines.shift_lines_back`, into two alternating buffers, the wafer's double
buffers); at every step each logical core multiplies the tiles it holds, as the wafer does.
Layouts as in :mod:`meshrt.movers`.
"""

from __future__ import annotations

import numpy as np

from ..collectives import reduce_to_root
from ..ops._lines import permute_line, shift_lines_back
from ..ops.estimate import gemm_t_segments
from ..precision import widen
from . import LineTiles, Mover, Product, register_mover


class ExactLines(LineTiles):
    """Tiles moved core by core; :attr:`cur` is what every core holds now.

    Parameters
    ----------
    block : ndarray
        The rank's tiles (not modified: the first move writes a new buffer).
    """

    def __init__(self, fab, block: np.ndarray, axis: int, line, name: str):
        self.fab, self.axis, self.line, self.name = fab, axis, line, name
        self.cur = block
        self._bufs = (np.empty_like(block), np.empty_like(block))  # the double buffers
        self._moves = 0

    def skew(self, amounts, kind, op="skew"):
        self.cur = shift_lines_back(
            self.fab, self.cur, self.axis, self.line, amounts, kind, op=f"{self.name}/{op}"
        )
        self._bufs = (self._bufs[0], self.cur)  # the skewed tiles are read once, then reused

    def permute(self, dest, op="shift"):
        out = self._bufs[self._moves % 2]
        self.cur = permute_line(
            self.fab, self.cur, self.axis, dest, self.line, out=out, op=f"{self.name}/{op}"
        )
        self._moves += 1


class ExactShiftProduct(Product):
    """Every logical core adds ``A_tile @ B_tile`` (B's columns masked by their group with
    labels) at every step; 16-bit words are widened into buffers made once."""

    def __init__(self, a: ExactLines, b: ExactLines, labels: np.ndarray | None):
        self.a, self.b = a, b
        a_cur, b_cur = a.cur, b.cur
        f32 = np.float32
        self.a32 = None if a_cur.dtype == f32 else np.empty(a_cur.shape, f32)
        self.b32 = None if b_cur.dtype == f32 else np.empty(b_cur.shape, f32)
        self.c = np.empty(a_cur.shape[:3] + b_cur.shape[3:], f32)  # [R, C, tmb, tnb]
        self.partial = np.empty_like(self.c)
        self.lab = None
        if labels is not None:  # per logical core, transposed: [R, C, 1, G, tnb]
            by, groups = labels.shape[0], labels.shape[3]
            rows, cols, tnb = b_cur.shape[0] // by, b_cur.shape[1], b_cur.shape[3]
            lab = labels.reshape(by, cols, tnb, groups)
            lab = np.swapaxes(lab, 2, 3)[:, :, None]
            self.lab = np.repeat(lab, rows, axis=0).astype(f32, copy=False)

    def step(self, t):
        a = self.a.cur if self.a32 is None else widen(self.a.cur, out=self.a32)
        b = self.b.cur if self.b32 is None else widen(self.b.cur, out=self.b32)
        if self.lab is not None:  # B's columns by group: bl[k, g, n] = B[k, n] [g(n) == g]
            r, c, tkb, tnb = b.shape
            b = (b[:, :, :, None, :] * self.lab).reshape(r, c, tkb * self.lab.shape[3], tnb)
        np.matmul(a, b, out=self.c if t == 0 else self.partial)
        if t:
            self.c += self.partial

    def result(self):
        return self.c


class ExactReducedProductT(Product):
    """dist-GEMM-T per group, core by core: at step ``t`` every core multiplies its A rows
    (masked by each group's features, once) by the B rows it holds, and the partials of each
    logical row are chain-reduced along x (:func:`meshrt.collectives.reduce_to_root`) to the
    column owning that B segment."""

    def __init__(self, fab, a: np.ndarray, b: ExactLines, labels: np.ndarray, plan, name: str):
        self.fab, self.b, self.plan, self.name = fab, b, plan, name
        lay = fab.layout
        by, bx, groups = lay.by, lay.bx, labels.shape[3]
        rows, td = plan.rows_per_core, a.shape[3]
        f32 = np.float32
        lab_t = np.swapaxes(labels, 2, 3).astype(f32, copy=False)  # [by, bx, G, D/Px]
        al = (
            a.reshape(by, bx, rows, plan.tmb, 1, td).astype(f32, copy=False)
            * lab_t[:, :, None, None, :, :]
        )  # [by, bx, rows, tmb, G, D/Px]: A's rows masked by each group's features
        self.al = al.reshape(by, bx, rows, plan.tmb * groups, td)
        self.groups = groups
        self.c = np.zeros((by, bx, rows, plan.tmb, groups, plan.cols_per_core, plan.tnb), f32)
        self.iy, self.ix = np.arange(by)[:, None], np.arange(bx)[None, :]
        self.my_rows = fab.index(0)

    def step(self, t):
        fab, plan = self.fab, self.plan
        lay = fab.layout
        by, bx, rows, cols = lay.by, lay.bx, plan.rows_per_core, plan.cols_per_core
        tnb, td = plan.tnb, self.al.shape[-1]
        b_t = self.b.cur.reshape(by, rows, bx, tnb, td).transpose(0, 2, 1, 4, 3)  # B^T view
        part = np.matmul(self.al, b_t.astype(np.float32, copy=False))
        part = part.reshape(by, bx, rows, plan.tmb, self.groups, tnb)
        seg = gemm_t_segments(plan, t)  # [Nl] per logical row
        for s in range(rows):
            seg_s = seg[np.arange(lay.py) * rows + s]  # per virtual row
            red = reduce_to_root(
                fab, part[:, :, s], 1, seg_s // cols, record=False, name=f"{self.name}/reduce"
            )  # [by, bx, tmb, G, tnb]
            slot = (seg_s % cols)[self.my_rows][:, None]
            self.c[self.iy, self.ix, s, :, :, slot, :] += red

    def result(self):
        c = self.c.transpose(0, 1, 2, 3, 5, 6, 4)  # [by, bx, rows, tmb, cols, tnb, G]
        by, bx, rows, tmb, cols, tnb, groups = c.shape
        return np.ascontiguousarray(c).reshape(by, bx, rows * tmb, cols * tnb, groups)


@register_mover
class ExactMover(Mover):
    """Every phase its own messages, every core its own products."""

    name = "exact"

    def lines(self, fab, block, axis, line, ids, key, name):
        return ExactLines(fab, block, axis, line, name)

    def shift_product(self, a, b, labels=None):
        assert isinstance(a, ExactLines) and isinstance(b, ExactLines)
        return ExactShiftProduct(a, b, labels)

    def reduced_product_t(self, a, b, labels, plan, name):
        assert isinstance(b, ExactLines)
        return ExactReducedProductT(b.fab, a, b, labels, plan, name)

    def allreduce(self, fab, block, axis, op, phases, name):
        return phases()
