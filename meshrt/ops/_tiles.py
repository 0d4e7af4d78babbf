"""Tile layouts shared by the GEMM kernels: padding, the logical ``lcm`` partition, host pre-skew.

Every GEMM kernel sees a ``Py x Px`` mesh as a square **logical mesh** of ``Nl x Nl`` cores,
``Nl = lcm(Py, Px)`` (the paper's partition for non-square meshes). Virtual core ``(py, px)``
holds the ``r x c`` logical cores ``(py*r + i, px*c + j)``, ``r = Nl/Py`` rows and ``c = Nl/Px``
columns of them (:attr:`GemmTiling.rows_per_core`, :attr:`GemmTiling.cols_per_core`), so a
logical tile array ``[Nl, Nl, s, t]`` and the virtual tiles ``[Py, Px, r*s, c*t]`` are the
same matrix cut two ways: a virtual tile is the contiguous block ``X[row-seg py, col-seg px]``.
Matrices are zero-padded so that every dimension is a multiple of ``Nl``; padding never changes
a product. On a square mesh ``r = c = 1`` and logical and virtual cores coincide.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..mesh import MeshError, ceil_div, lcm, pad_to
from ..precision import as_storage


def _check_blocks(layout, what: str, a_shape: tuple, b_shape: tuple, axes: str, fix: str) -> tuple:
    """``(per_x, per_y)``, logical cores per virtual core along x and y, once both operands'
    rank blocks are ``[by, bx, *tile]`` with tiles cut whole by the logical mesh; a
    :class:`MeshError` naming the operand, the ``axes`` of its tiles and how to ``fix`` it
    otherwise."""
    py, px = layout.py, layout.px
    nl = lcm(py, px)
    per_x, per_y = nl // px, nl // py
    for name, shape in (("A", a_shape), ("B", b_shape)):
        if len(shape) != 4 or tuple(shape[:2]) != (layout.by, layout.bx):
            raise MeshError(
                f"{what}: {name} block has shape {tuple(shape)}; expected "
                f"({layout.by}, {layout.bx}, {axes}) on {layout}"
            )
        if shape[2] % per_y or shape[3] % per_x:
            raise MeshError(
                f"{what}: {name} tiles are {shape[2]}x{shape[3]}, but a {py}x{px} mesh is cut "
                f"into a {nl}x{nl} logical mesh, so tile rows must be a multiple of {per_y} and "
                f"columns of {per_x}: pad every dimension to a multiple of {nl} ({fix})"
            )
    return per_x, per_y


@dataclass(frozen=True)
class GemmTiling:
    """``C[M, N] = A[M, K] @ B[K, N]`` on a ``py x px`` mesh, in logical tiles.

    Parameters
    ----------
    py, px : int
        Virtual mesh.
    tmb, tkb, tnb : int
        Logical tile sizes: ``M``, ``K`` and ``N`` padded to ``Nl * tmb`` etc.
    """

    py: int
    px: int
    tmb: int
    tkb: int
    tnb: int

    @classmethod
    def for_shapes(cls, m: int, k: int, n: int, mesh: tuple[int, int]) -> GemmTiling:
        py, px = mesh
        nl = lcm(py, px)
        return cls(py, px, ceil_div(m, nl), ceil_div(k, nl), ceil_div(n, nl))

    @classmethod
    def from_blocks(cls, layout, a_shape: tuple, b_shape: tuple, what: str = "A @ B") -> GemmTiling:
        """The plan of rank blocks ``a: [by, bx, M/Py, K/Px]`` and ``b: [by, bx, K/Py, N/Px]``."""
        py, px = layout.py, layout.px
        per_x, per_y = _check_blocks(
            layout, what, a_shape, b_shape, "rows, cols", "the prepare_* functions do"
        )
        if a_shape[3] // per_x != b_shape[2] // per_y:
            raise MeshError(
                f"{what}: inner dimensions differ: A tiles {a_shape[2:]} hold "
                f"K = {a_shape[3] * px}, B tiles {b_shape[2:]} hold "
                f"K = {b_shape[2] * py}"
            )
        return cls(py, px, a_shape[2] // per_y, a_shape[3] // per_x, b_shape[3] // per_x)

    @classmethod
    def from_blocks_t(
        cls, layout, a_shape: tuple, b_shape: tuple, what: str = "A @ B^T"
    ) -> GemmTiling:
        """The plan of ``C = A @ B^T`` (dist-GEMM-T) on rank blocks ``a: [by, bx, M/Py, D/Px]``
        and ``b: [by, bx, N/Py, D/Px]``: ``tkb`` is the logical feature segment, ``tnb`` the
        logical segment of B's rows."""
        py, px = layout.py, layout.px
        per_x, per_y = _check_blocks(
            layout, what, a_shape, b_shape, "seq, dim", "natural_tiles does"
        )
        if a_shape[3] != b_shape[3]:
            raise MeshError(
                f"{what}: A tiles hold {a_shape[3]} features per core, B tiles {b_shape[3]}"
            )
        return cls(py, px, a_shape[2] // per_y, a_shape[3] // per_x, b_shape[2] // per_y)

    @property
    def nl(self) -> int:
        """Logical mesh side ``lcm(Py, Px)``."""
        return lcm(self.py, self.px)

    @property
    def cols_per_core(self) -> int:
        """Logical columns of cores per virtual core (``Nl / Px``)."""
        return self.nl // self.px

    @property
    def rows_per_core(self) -> int:
        """Logical rows of cores per virtual core (``Nl / Py``)."""
        return self.nl // self.py

    @property
    def tile_a(self) -> tuple[int, int]:
        """Virtual A tile ``[M/Py, K/Px]``."""
        return self.rows_per_core * self.tmb, self.cols_per_core * self.tkb

    @property
    def tile_b(self) -> tuple[int, int]:
        """Virtual B tile ``[K/Py, N/Px]``."""
        return self.rows_per_core * self.tkb, self.cols_per_core * self.tnb

    @property
    def tile_c(self) -> tuple[int, int]:
        """Virtual C tile ``[M/Py, N/Px]``."""
        return self.rows_per_core * self.tmb, self.cols_per_core * self.tnb

    @property
    def padded(self) -> tuple[int, int, int]:
        """``(M, K, N)`` after padding."""
        return self.nl * self.tmb, self.nl * self.tkb, self.nl * self.tnb


def natural_tiles(x: np.ndarray, mesh: tuple[int, int], dtype=np.float32) -> np.ndarray:
    """Host layout of a matrix: ``tiles[py, px] = X[row-seg py, col-seg px]``.

    Both dimensions are zero-padded to a multiple of ``lcm(Py, Px)``.

    Returns
    -------
    ndarray
        ``[Py, Px, R/Py, C/Px]`` (padded ``R``, ``C``), contiguous, in ``dtype``.
    """
    py, px = mesh
    nl = lcm(py, px)
    if x.ndim != 2:
        raise ValueError(f"expected a matrix, got shape {x.shape}")
    r, c = (ceil_div(s, nl) * nl for s in x.shape)
    t = pad_to(as_storage(x, dtype), (r, c)).reshape(py, r // py, px, c // px)
    return np.ascontiguousarray(t.transpose(0, 2, 1, 3))


def preskewed_b_tiles(
    b: np.ndarray, mesh: tuple[int, int], positions: np.ndarray, order: np.ndarray, dtype=np.float32
) -> np.ndarray:
    """Host pre-skew of the right operand on the logical mesh.

    Logical core ``(i, j)`` gets ``B[order[(pos[i] + pos[j]) mod Nl]-seg, j-seg]`` where ``pos``
    and ``order`` describe the ring (for MeshGEMM's interleaved ring this is the paper's
    ``ind[i, j] = L[(pos i + pos j) mod P]``).

    Returns
    -------
    ndarray
        ``[Py, Px, K/Py, N/Px]`` virtual tiles (``Nl/Py x Nl/Px`` logical tiles each), in ``dtype``.
    """
    py, px = mesh
    nl = lcm(py, px)
    k, n = (ceil_div(s, nl) * nl for s in b.shape)
    tkb, tnb = k // nl, n // nl
    blocks = pad_to(as_storage(b, dtype), (k, n)).reshape(nl, tkb, nl, tnb)
    ind = order[(positions[:, None] + positions[None, :]) % nl]  # [Nl, Nl] k-block
    logical = blocks[ind, :, np.arange(nl)[None, :], :]  # [Nl, Nl, tkb, tnb]
    return logical_to_virtual(logical, mesh)


def logical_to_virtual(t: np.ndarray, mesh: tuple[int, int]) -> np.ndarray:
    """``[Nl, Nl, s, u]`` logical tiles (or a rank's ``[by*r, bx*c, s, u]``) as virtual tiles
    ``[Py, Px, r*s, c*u]`` (``[by, bx, r*s, c*u]``); ``r``, ``c``: logical rows and columns per
    virtual core."""
    py, px = mesh
    nl = lcm(py, px)
    r, c = nl // py, nl // px
    ly, lx, s, u = t.shape
    if r == 1 and c == 1:
        return t
    v = t.reshape(ly // r, r, lx // c, c, s, u).transpose(0, 2, 1, 4, 3, 5)
    return np.ascontiguousarray(v).reshape(ly // r, lx // c, r * s, c * u)


def virtual_to_logical(t: np.ndarray, mesh: tuple[int, int]) -> np.ndarray:
    """Inverse of :func:`logical_to_virtual`: ``[by, bx, r*s, c*u]`` to ``[by*r, bx*c, s, u]``.

    A view when the mesh is square; a contiguous copy otherwise.
    """
    py, px = mesh
    nl = lcm(py, px)
    r, c = nl // py, nl // px
    vy, vx, rs, cu = t.shape
    if r == 1 and c == 1:
        return t
    v = t.reshape(vy, vx, r, rs // r, c, cu // c).transpose(0, 2, 1, 4, 3, 5)
    return np.ascontiguousarray(v).reshape(vy * r, vx * c, rs // r, cu // c)


def priced_plan(plan: GemmTiling, priced: tuple[int, int, int] | None) -> GemmTiling:
    """The plan the ledger prices: ``plan``, or that of the ``(m, k, n)`` shapes ``priced`` when
    the blocks carry more padding than the modeled device would (never larger than ``plan``)."""
    if priced is None:
        return plan
    cost = GemmTiling.for_shapes(*priced, (plan.py, plan.px))
    if cost.tmb > plan.tmb or cost.tkb > plan.tkb or cost.tnb > plan.tnb:
        raise ValueError(f"priced shapes {priced} exceed the blocks' plan {plan}")
    return cost


def preskewed_b_region(
    get,
    shape: tuple[int, int],
    mesh: tuple[int, int],
    positions: np.ndarray,
    order: np.ndarray,
    origin: tuple[int, int],
    block: tuple[int, int],
    storage: str = "float32",
    chunk_elements: int = 8 << 20,
) -> np.ndarray:
    """Cores ``origin .. origin + block`` of :func:`preskewed_b_tiles`, built piece by piece.

    ``get(rows, cols) -> f32[len(rows), len(cols)]`` reads entries of the padded ``B[K, N]``
    (``K``, ``N`` multiples of ``Nl``). Pieces run over this rank's core columns (output
    features, which a reader of ``[out, in]`` weights reads in contiguous runs); every piece
    asks for the input rows its cores hold after the skew. Returns ``[by, bx, K/Py, N/Px]`` words.
    """
    from ..precision import to_words, word_dtype

    py, px = mesh
    nl = lcm(py, px)
    k, n = shape
    tkb, tnb = k // nl, n // nl
    r, c = nl // py, nl // px  # logical rows / columns per virtual core
    y0, x0 = origin
    by, bx = block
    out = np.empty((by, bx, r * tkb, c * tnb), word_dtype(storage))
    ly = np.arange(y0 * r, (y0 + by) * r)  # this rank's logical rows
    step = max(1, chunk_elements // max(1, c * tnb * k))
    for v0 in range(0, bx, step):
        v1 = min(bx, v0 + step)
        lx = np.arange((x0 + v0) * c, (x0 + v1) * c)  # logical columns of the piece
        ind = order[(positions[ly][:, None] + positions[lx][None, :]) % nl]  # k-block per core
        kblocks = np.unique(ind)
        rows = (kblocks[:, None] * tkb + np.arange(tkb)[None, :]).ravel()
        cols = (lx[:, None] * tnb + np.arange(tnb)[None, :]).ravel()
        piece = get(rows, cols).reshape(len(kblocks), tkb, len(lx), tnb)
        where = np.searchsorted(kblocks, ind)  # [len(ly), len(lx)]
        logical = piece[where, :, np.arange(len(lx))[None, :], :]  # [ly, lx, tkb, tnb]
        t = logical.reshape(by, r, v1 - v0, c, tkb, tnb).transpose(0, 2, 1, 4, 3, 5)
        out[:, v0:v1] = to_words(t.reshape(by, v1 - v0, r * tkb, c * tnb), storage)
    return out
