"""Regions of the wafer's fabric: a logical mesh folded onto a rectangle, and packing by area.

A pipeline stage computes on a logical ``Py x Px`` mesh. Its cores need not sit in a ``Py x Px``
square of the fabric: the mesh can be *folded* onto a rectangle, as MeshGEMM's interleaved ring
folds a ring onto a line. Folding a logical mesh ``f`` times along x cuts every logical row into
``f`` segments of ``w = ceil(Px / f)`` cores and lays them in ``f`` consecutive physical rows,
alternating direction (a boustrophedon)::

    logical row r, column c  ->  physical row f*r + c // w,
                                 physical column  c % w        (segment c // w even)
                                                  w - 1 - c % w (segment c // w odd)

The region is ``f*Py x w``. Two logical neighbours in a row stay one hop apart (at a segment
end the next core sits right below: the turn is one vertical hop); two logical neighbours in a
column are ``f`` physical rows apart, ``f`` hops. Folding along y is the same with the axes
swapped. :func:`fold_coordinates` gives the mapping, :func:`link_hops` the hop count of each
logical link from it, and :attr:`Fold.links` the closed form (tests tie the two).

A pre-routed path forwards a wavelet one hop per cycle without a routing stage, so a logical
link of ``f`` hops costs ``f`` times the per-hop latency and nothing else: the cost model prices
a folded stage's steps with ``alpha`` scaled by the links their traffic crosses
(:func:`llm.engine.kinds.charge`).

:class:`Fabric` packs regions on a wafer's ``cores_y x cores_x`` usable cores (maximal free
rectangles, bottom-left first), trying each region unfolded first, then folded 2, 3 and 4 times
along x or y. :meth:`Fabric.largest_square` finds the largest square logical mesh that still
fits somewhere, folded or not (a pipeline's remainder stage, :mod:`llm.cost.wafer`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from meshrt.mesh import X, Y

#: Fold factors tried, cheapest first.
FOLD_FACTORS = (1, 2, 3, 4)


def _cd(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class Fold:
    """A logical mesh folded ``factor`` times along ``axis`` (:data:`~meshrt.mesh.X`: each
    logical row cut into ``factor`` segments; :data:`~meshrt.mesh.Y`: each logical column)."""

    factor: int = 1
    axis: int = X

    def shape(self, mesh: tuple[int, int]) -> tuple[int, int]:
        """The physical region ``(rows, columns)`` the folded ``mesh`` occupies."""
        py, px = mesh
        if self.factor == 1:
            return py, px
        if self.axis == X:
            return self.factor * py, _cd(px, self.factor)
        return _cd(py, self.factor), self.factor * px

    @property
    def links(self) -> tuple[int, int]:
        """Physical hops of one logical link along ``(y, x)`` (closed form)."""
        if self.factor == 1:
            return 1, 1
        return (self.factor, 1) if self.axis == X else (1, self.factor)

    def describe(self) -> str:
        if self.factor == 1:
            return "unfolded"
        along = "x" if self.axis == X else "y"
        return f"folded {self.factor}x along {along}"


UNFOLDED = Fold()


def fold_options() -> list[Fold]:
    """Every fold :class:`Fabric` tries, cheapest first."""
    out = [UNFOLDED]
    for f in FOLD_FACTORS[1:]:
        out += [Fold(f, X), Fold(f, Y)]
    return out


def fold_coordinates(mesh: tuple[int, int], fold: Fold) -> tuple[np.ndarray, np.ndarray]:
    """Physical ``(row, column)`` of every logical core of ``mesh`` under ``fold``.

    Returns
    -------
    rows, cols : int[Py, Px]
        Offsets inside the region of :meth:`Fold.shape`.
    """
    py, px = mesh
    r, c = np.meshgrid(np.arange(py), np.arange(px), indexing="ij")
    if fold.factor == 1:
        return r, c
    if fold.axis == Y:  # the same fold with the axes swapped
        cols, rows = fold_coordinates((px, py), Fold(fold.factor, X))
        return rows.T, cols.T
    w = _cd(px, fold.factor)
    seg, pos = c // w, c % w
    return fold.factor * r + seg, np.where(seg % 2 == 0, pos, w - 1 - pos)


def link_hops(mesh: tuple[int, int], fold: Fold) -> tuple[int, int]:
    """Largest physical hop count of a logical link along ``(y, x)``, measured on the mapping
    of :func:`fold_coordinates` (the closed form is :attr:`Fold.links`)."""
    rows, cols = fold_coordinates(mesh, fold)
    out = []
    for axis in (Y, X):
        a = [np.diff(rows, axis=axis), np.diff(cols, axis=axis)]
        d = np.abs(a[0]) + np.abs(a[1])
        out.append(int(d.max()) if d.size else 1)
    return out[0], out[1]


@dataclass(frozen=True)
class Region:
    """Where a stage sits: ``(y, x)`` of its top-left core, its physical size, its fold."""

    y: int
    x: int
    height: int
    width: int
    fold: Fold = UNFOLDED

    @property
    def links(self) -> tuple[int, int]:
        return self.fold.links

    @property
    def cores(self) -> int:
        return self.height * self.width


class Fabric:
    """Free space of one wafer's ``height x width`` usable cores, packed region by region.

    Free space is kept as maximal free rectangles (they may overlap); a region goes to the free
    position with the smallest ``(y, x)`` that holds it.
    """

    def __init__(self, height: int, width: int):
        self.height, self.width = height, width
        self.free: list[tuple[int, int, int, int]] = [(0, 0, height, width)]
        self.regions: list[Region] = []

    def copy(self) -> Fabric:
        other = Fabric(self.height, self.width)
        other.free, other.regions = list(self.free), list(self.regions)
        return other

    @property
    def used_cores(self) -> int:
        return sum(r.cores for r in self.regions)

    def spot(self, h: int, w: int) -> tuple[int, int] | None:
        """Top-left ``(y, x)`` of the first free position that holds ``h x w``."""
        best = None
        for fy, fx, fh, fw in self.free:
            if h <= fh and w <= fw and (best is None or (fy, fx) < best):
                best = (fy, fx)
        return best

    def take(self, y: int, x: int, h: int, w: int, fold: Fold = UNFOLDED) -> Region:
        """Mark ``h x w`` at ``(y, x)`` used; returns the region."""
        pieces = []
        for fy, fx, fh, fw in self.free:
            if fy >= y + h or y >= fy + fh or fx >= x + w or x >= fx + fw:
                pieces.append((fy, fx, fh, fw))
                continue
            if fy < y:
                pieces.append((fy, fx, y - fy, fw))
            if fy + fh > y + h:
                pieces.append((y + h, fx, fy + fh - y - h, fw))
            if fx < x:
                pieces.append((fy, fx, fh, x - fx))
            if fx + fw > x + w:
                pieces.append((fy, x + w, fh, fx + fw - x - w))
        self.free = [
            p
            for i, p in enumerate(pieces)
            if p[2] > 0
            and p[3] > 0
            and not any(
                j != i and _inside(p, q) and (p != q or j < i) for j, q in enumerate(pieces)
            )
        ]
        region = Region(y, x, h, w, fold)
        self.regions.append(region)
        return region

    def place(self, mesh: tuple[int, int]) -> Region | None:
        """Place a logical ``mesh``: unfolded if it fits, else the cheapest fold that fits."""
        for fold in fold_options():
            h, w = fold.shape(mesh)
            at = self.spot(h, w)
            if at is not None:
                return self.take(*at, h, w, fold)
        return None

    def largest_square(self, max_side: int) -> tuple[int, Fold, tuple[int, int]] | None:
        """The largest ``s x s`` logical mesh (``s <= max_side``) that fits a free rectangle,
        under any fold: ``(s, fold, (y, x))``, or ``None`` when nothing is free."""
        best = None
        for fy, fx, fh, fw in self.free:
            for fold in fold_options():
                f = fold.factor
                if f == 1:
                    s = min(fh, fw)
                elif fold.axis == X:  # f*s rows, ceil(s/f) columns
                    s = min(fh // f, fw * f)
                else:
                    s = min(fw // f, fh * f)
                s = min(s, max_side)
                if s > 0 and (best is None or (s, -f) > (best[0], -best[1].factor)):
                    best = (s, fold, (fy, fx))
        return best


def _inside(p: tuple, q: tuple) -> bool:
    """Whether free rectangle ``p`` lies inside ``q``."""
    return (
        p[0] >= q[0] and p[1] >= q[1] and p[0] + p[2] <= q[0] + q[2] and p[1] + p[3] <= q[1] + q[3]
    )
