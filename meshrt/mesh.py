"""Pure mesh maths: shapes, ownership, tiling, padding and the interleaved ring.

Nothing here touches MPI, so every function is unit-testable in one process.

Conventions
-----------
* The **virtual mesh** has ``Py x Px`` cores with coordinates ``(py, px)``; ``y`` grows southward
  (axis 0), ``x`` eastward (axis 1).
* The **rank grid** has ``Ry x Rx`` MPI ranks. Rank ``(ry, rx)`` owns the block of
  ``by x bx = Py/Ry x Px/Rx`` virtual cores whose first core is ``(ry*by, rx*bx)``.
* A rank's share of a distributed matrix is one ndarray of tiles, shape ``(by, bx, *tile)``.
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass

import numpy as np


class Axis(enum.IntEnum):
    """A mesh axis: ``Y`` (rows, numpy axis 0 of a rank block) or ``X`` (columns, axis 1).

    An ``int``, so it indexes shapes and numpy axes directly; :meth:`of` reads the names
    ``"y"`` and ``"x"`` where a user or a file gives them.
    """

    Y = 0
    X = 1

    @classmethod
    def of(cls, axis: Axis | int | str) -> Axis:
        """``axis`` as an :class:`Axis`: itself, ``0``/``1``, or ``"y"``/``"x"``."""
        if isinstance(axis, str):
            key = axis.strip().upper()
            if key in cls.__members__:
                return cls[key]
            raise ValueError(f"mesh axis must be 'y' or 'x', not {axis!r}")
        return cls(axis)

    @property
    def other(self) -> Axis:
        """The other axis."""
        return Axis(1 - self)

    @property
    def letter(self) -> str:
        """``"y"`` or ``"x"``."""
        return self.name.lower()


Y, X = Axis.Y, Axis.X


class MeshError(ValueError):
    """A mesh, rank grid or shape that cannot be used; the message says what would be valid."""


def parse_grid(text: str, what: str = "mesh") -> tuple[int, int]:
    """Parse ``"4x6"`` (or ``"4"`` meaning ``4x4``) into ``(rows, cols)``.

    Raises
    ------
    MeshError
        If the text is not of that form or a size is not positive.
    """
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX*,]\s*(\d+))?\s*", str(text))
    if not m:
        raise MeshError(f"{what} {text!r} is not of the form ROWSxCOLS, e.g. 4x4 or 2x3")
    rows = int(m.group(1))
    cols = int(m.group(2)) if m.group(2) is not None else rows
    if rows <= 0 or cols <= 0:
        raise MeshError(f"{what} {text!r}: sizes must be positive")
    return rows, cols


def divisors(n: int) -> list[int]:
    """All positive divisors of ``n`` in increasing order."""
    return [d for d in range(1, n + 1) if n % d == 0]


def default_rank_grid(nranks: int, py: int | None = None, px: int | None = None) -> tuple[int, int]:
    """The most square ``Ry x Rx = nranks`` grid that divides the virtual mesh (if given).

    Ties prefer ``Ry <= Rx``. Raises ``MeshError`` naming valid rank counts when none fits.
    """
    best = None
    for ry in divisors(nranks):
        rx = nranks // ry
        if py is not None and py % ry:
            continue
        if px is not None and px % rx:
            continue
        key = (abs(ry - rx), ry > rx)
        if best is None or key < best[0]:
            best = (key, (ry, rx))
    if best is None:  # only when both sides are given: a free side always fits R = 1
        assert py is not None and px is not None
        raise MeshError(
            f"{nranks} ranks cannot tile a {py}x{px} virtual mesh: need Ry | {py} and Rx | {px}; "
            f"rank counts that fit: {valid_rank_counts(py, px)}"
        )
    return best[1]


def valid_rank_counts(py: int, px: int, limit: int = 64) -> list[int]:
    """Rank counts up to ``limit`` that can tile a ``py x px`` virtual mesh."""
    return sorted({ry * rx for ry in divisors(py) for rx in divisors(px) if ry * rx <= limit})


@dataclass(frozen=True)
class MeshLayout:
    """A ``py x px`` virtual mesh over an ``ry x rx`` rank grid.

    Parameters
    ----------
    py, px : int
        Virtual cores along y (rows) and x (columns).
    ry, rx : int
        MPI ranks along y and x. They must divide ``py`` and ``px``.
    """

    py: int
    px: int
    ry: int = 1
    rx: int = 1

    def __post_init__(self):
        for name in ("py", "px", "ry", "rx"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or v <= 0:
                raise MeshError(f"{name}={v!r}: mesh and rank-grid sizes must be positive integers")
        bad = []
        if self.py % self.ry:
            bad.append(f"Ry={self.ry} does not divide Py={self.py} (valid Ry: {divisors(self.py)})")
        if self.px % self.rx:
            bad.append(f"Rx={self.rx} does not divide Px={self.px} (valid Rx: {divisors(self.px)})")
        if bad:
            raise MeshError(
                f"virtual mesh {self.py}x{self.px} on rank grid {self.ry}x{self.rx}: "
                + "; ".join(bad)
            )

    @classmethod
    def parse(cls, mesh: str, ranks: str | None = None, nranks: int | None = None) -> MeshLayout:
        """Build from ``"PYxPX"`` and either ``"RYxRX"`` or a rank count (then pick a grid)."""
        py, px = parse_grid(mesh, "virtual mesh")
        if ranks is not None:
            ry, rx = parse_grid(ranks, "rank grid")
            if nranks is not None and ry * rx != nranks:
                raise MeshError(
                    f"rank grid {ry}x{rx} needs {ry * rx} ranks but {nranks} are running"
                )
        else:
            ry, rx = default_rank_grid(nranks or 1, py, px)
        return cls(py, px, ry, rx)

    @property
    def by(self) -> int:
        """Virtual cores per rank along y."""
        return self.py // self.ry

    @property
    def bx(self) -> int:
        """Virtual cores per rank along x."""
        return self.px // self.rx

    @property
    def nranks(self) -> int:
        return self.ry * self.rx

    def cores(self, axis: int) -> int:
        """Virtual cores along ``axis`` (0 = y, 1 = x)."""
        return (self.py, self.px)[axis]

    def ranks(self, axis: int) -> int:
        """Ranks along ``axis``."""
        return (self.ry, self.rx)[axis]

    def block(self, axis: int) -> int:
        """Virtual cores per rank along ``axis``."""
        return (self.by, self.bx)[axis]

    def origin(self, coords: tuple[int, int]) -> tuple[int, int]:
        """Global coordinates of the first core owned by rank ``coords = (ry, rx)``."""
        return coords[0] * self.by, coords[1] * self.bx

    def owner(self, py: int, px: int) -> tuple[int, int]:
        """Rank coordinates ``(ry, rx)`` owning virtual core ``(py, px)``."""
        return py // self.by, px // self.bx

    def __str__(self) -> str:
        return (
            f"{self.py}x{self.px} cores on {self.ry}x{self.rx} ranks ({self.by}x{self.bx} per rank)"
        )


# ----------------------------------------------------------------------------------------------
# Padding and tiling of global arrays
# ----------------------------------------------------------------------------------------------


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def padded(n: int, parts: int, multiple: int = 1) -> int:
    """Smallest length ``>= n`` that splits into ``parts`` equal segments, each a multiple of
    ``multiple``."""
    step = parts * multiple
    return ceil_div(n, step) * step


def pad_to(a: np.ndarray, shape: tuple[int, ...], value=0) -> np.ndarray:
    """Zero-pad (or ``value``-pad) ``a`` at the high end of each axis up to ``shape``."""
    if tuple(a.shape) == tuple(shape):
        return a
    widths = [(0, s - n) for n, s in zip(a.shape, shape)]
    if any(w[1] < 0 for w in widths):
        raise MeshError(f"cannot pad shape {a.shape} to smaller shape {shape}")
    return np.pad(a, widths, constant_values=value)


def tile_shape(shape: tuple[int, int], mesh_shape: tuple[int, int]) -> tuple[int, int]:
    """Tile shape of a ``(M, N)`` matrix cut into ``(Py, Px)`` tiles after padding."""
    return ceil_div(shape[0], mesh_shape[0]), ceil_div(shape[1], mesh_shape[1])


def to_tiles(
    a: np.ndarray,
    mesh_shape: tuple[int, int],
    tile: tuple[int, int] | None = None,
) -> np.ndarray:
    """Cut a global ``(M, N)`` matrix into tiles, padding with zeros.

    Returns
    -------
    ndarray
        ``tiles[py, px] = a[py*tm:(py+1)*tm, px*tn:(px+1)*tn]``, shape ``(Py, Px, tm, tn)``.
    """
    py, px = mesh_shape
    tm, tn = tile if tile is not None else tile_shape(a.shape, mesh_shape)
    a = pad_to(a, (py * tm, px * tn))
    return a.reshape(py, tm, px, tn).transpose(0, 2, 1, 3)


def from_tiles(tiles: np.ndarray, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Inverse of :func:`to_tiles`: assemble ``(Py, Px, tm, tn)`` tiles, cropping to ``shape``."""
    py, px, tm, tn = tiles.shape
    a = tiles.transpose(0, 2, 1, 3).reshape(py * tm, px * tn)
    if shape is not None:
        a = a[: shape[0], : shape[1]]
    return a


# ----------------------------------------------------------------------------------------------
# The interleaved two-hop ring (MeshGEMM)
# ----------------------------------------------------------------------------------------------


def ring_order(n: int) -> np.ndarray:
    """Ring order ``L`` over physical indices ``0..n-1``: evens ascending, then odds descending.

    ``L = [0, 2, 4, ..., (largest even), (largest odd), ..., 3, 1]``. Consecutive entries (and the
    closing pair ``L[-1] -> L[0]``, i.e. ``1 -> 0``) are at most two physical hops apart, so the
    ring needs no wrap-around link.
    """
    if n <= 0:
        raise MeshError(f"ring of {n} cores")
    evens = np.arange(0, n, 2)
    odds = np.arange(1, n, 2)[::-1]
    return np.concatenate([evens, odds]).astype(np.int64)


def ring_pos(n: int) -> np.ndarray:
    """Position of each physical index in the ring: ``pos[L[r]] = r``."""
    order = ring_order(n)
    pos = np.empty(n, dtype=np.int64)
    pos[order] = np.arange(n)
    return pos


def ring_next(n: int) -> np.ndarray:
    """``nxt[i]``: physical index that core ``i`` sends to when the ring turns forward."""
    order, pos = ring_order(n), ring_pos(n)
    return order[(pos + 1) % n]


def ring_prev(n: int) -> np.ndarray:
    """``prv[i]``: physical index that core ``i`` receives from when the ring turns forward."""
    order, pos = ring_order(n), ring_pos(n)
    return order[(pos - 1) % n]


def skew_index(n: int) -> np.ndarray:
    """MeshGEMM host pre-skew: ``ind[i, j] = L[(pos(i) + pos(j)) mod n]``."""
    order, pos = ring_order(n), ring_pos(n)
    return order[(pos[:, None] + pos[None, :]) % n]


def lcm(a: int, b: int) -> int:
    return a * b // math.gcd(a, b)


def grid_coords(rank: int, grid: tuple[int, int]) -> tuple[int, int]:
    """Position ``(ry, rx)`` of rank ``rank`` in a row-major ``Ry x Rx`` rank grid.

    Row-major is the order of a non-reordered MPI Cartesian communicator, so this is what
    ``Create_cart(..., reorder=False).Get_coords(rank)`` returns; it is the one place where a
    rank number becomes a grid position.

    Raises
    ------
    MeshError
        If ``rank`` is not in ``0 .. Ry*Rx - 1``.
    """
    ry, rx = int(grid[0]), int(grid[1])
    if not 0 <= int(rank) < ry * rx:
        raise MeshError(f"rank {rank} is not in a {ry}x{rx} rank grid ({ry * rx} ranks)")
    return divmod(int(rank), rx)
