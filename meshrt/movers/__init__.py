"""Movers: how the emulator moves a kernel's tiles and forms its products.

A kernel that moves operand tiles along the lines of the mesh (MeshGEMM, Cannon, the grouped
dist-GEMM-T and MeshGEMM) or reduces along them (the K-tree allreduce) is written once, against
a :class:`Mover`; the :class:`~meshrt.fabric.Fabric` holds the mover, chosen once when it is
built. Two backends, with the same neighbour messages (peers, sizes and names) and the same
ledger, the wafer's schedule being priced either way:

==============  ===============================================================================
``exact``       every phase runs as its own neighbour messages and every logical core multiplies
                its own tiles at every step (:mod:`meshrt.movers.exact`)
``aggregated``  tiles are tracked by identity, only those crossing a rank boundary are copied
                (the same messages, posted without blocking), and each rank's products are
                computed as a few whole GEMMs at the end; a K-tree allreduce joins each rank's
                partial in one sweep per direction (:mod:`meshrt.movers.aggregated`)
==============  ===============================================================================

Layouts (rank blocks of logical tiles, ``Nl = lcm(Py, Px)``, see :mod:`meshrt.ops._tiles`):
an operand moving along x is ``[lines, line.size, *tile]`` (lines: the rank's logical rows),
along y ``[line.size, lines, *tile]``; every tile of a line has an *identity* ``0 .. Nl-1``
(the operand segment it carries, e.g. its K segment), ``ids[l, i]`` being the identity of the
tile at logical core ``i`` of line ``l`` before the first move.

:data:`DEFAULT_EMULATION` is the one default of the fabric, the model and the command line.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, TypeAlias

import numpy as np

# This module imports nothing of the project: the fabric holds a mover, and the backends
# (which move tiles through the fabric) register themselves when :mod:`meshrt` is imported.
Fabric: TypeAlias = Any  # meshrt.fabric.Fabric
Line: TypeAlias = Any  # meshrt.ops._lines.Line
GemmTiling: TypeAlias = Any  # meshrt.ops._tiles.GemmTiling

#: The emulation of every fabric, model and run unless told otherwise: the one statement of the
#: default (``Fabric``, ``MeshModel``, ``RunOptions``, ``--emulation`` read it). Measured
#: 2026-12-06, 2 ranks on a loaded 2-core machine, llama-100m, 43-token prompt, 32 tokens, medians
#: of 3: aggregated TTFT 2.1x (4x4 mesh) and 3.0x (8x8) shorter than exact, time per token 1.4x and
#: 1.05x; one LLaMA3-8B layer prefilling 256 tokens on 96x96 cores: 15 s against 85 s.
DEFAULT_EMULATION = "aggregated"


class LineTiles:
    """An operand's tiles moving along the lines of the mesh (read-only: the block a kernel
    passes in is never modified).

    Moves are collective along the lines' axis: every rank of a rank line makes the same calls
    in the same order. Message names are ``name + "/" + op``.
    """

    def skew(self, amounts: np.ndarray, kind: str, op: str = "skew") -> None:
        """Line ``l`` moves back ``amounts[l]`` positions on the ``kind`` ring, the shorter
        way round (:func:`meshrt.ops._lines.shift_lines_back`)."""
        raise NotImplementedError

    def permute(self, dest: np.ndarray, op: str = "shift") -> None:
        """One step of every line: logical core ``i`` sends its tile to ``dest[i]``
        (:func:`meshrt.ops._lines.permute_line`)."""
        raise NotImplementedError


class Product:
    """The products a kernel forms while its operands move: :meth:`step` once per shift step,
    before the operands move on, then :meth:`result`."""

    def step(self, t: int) -> None:
        """Step ``t``: multiply (and reduce) what every core holds now (or note that it is
        due)."""
        raise NotImplementedError

    def result(self) -> np.ndarray:
        """The accumulated products (layout: the kernel's, see the ``Mover`` methods)."""
        raise NotImplementedError


class Mover:
    """One way of emulating data movement (a backend); a :class:`~meshrt.fabric.Fabric` holds
    one. Subclasses register with :func:`register_mover`."""

    #: The name ``Fabric(mover=...)`` and ``--emulation`` take.
    name: ClassVar[str] = ""

    def lines(
        self,
        fab: Fabric,
        block: np.ndarray,
        axis: int,
        line: Line,
        ids: Callable[[], np.ndarray],
        key: tuple,
        name: str,
    ) -> LineTiles:
        """The tiles of ``block`` moving along ``axis``.

        Parameters
        ----------
        block : ndarray
            ``[lines, line.size, *tile]`` along x (``axis=1``), ``[line.size, lines, *tile]``
            along y: the rank's cores of each line.
        line : Line
            This rank's share of every line.
        ids : callable
            Returns ``int[lines, line.n]``, the identity of the tile at every logical core of
            every line (called at most once per ``key``).
        key : tuple
            Names the sequence of moves the kernel will make for this layout, hashable: a
            backend may work the moves out once per key (:attr:`Fabric.plans`) and replay them.
        name : str
            Prefix of the message names.
        """
        raise NotImplementedError

    def shift_product(
        self, a: LineTiles, b: LineTiles, labels: np.ndarray | None = None
    ) -> Product:
        """``C[r, c] = sum_k A[r, k] @ B[k, c]`` of operands moving by :meth:`lines`: A's lines
        along x and B's along y, each tile identified by its K segment.

        At every step each logical core ``(r, c)`` holds one K segment of both (the kernel's
        skew sees to it); A's tiles are ``[tmb, tkb * G]`` (K-major, group-minor, ``G = 1``
        without ``labels``), B's ``[tkb, tnb]``.

        Parameters
        ----------
        labels : ndarray, optional
            ``[by, bx, N/Px, G]`` one-hot group of each output column (they never move):
            column ``f`` multiplies A's group ``g(f)`` slice (grouped MeshGEMM).

        Returns
        -------
        Product
            Whose result is ``f32[by * Nl/Py, bx * Nl/Px, tmb, tnb]`` (logical tiles).
        """
        raise NotImplementedError

    def reduced_product_t(
        self, a: np.ndarray, b: LineTiles, labels: np.ndarray, plan: GemmTiling, name: str
    ) -> Product:
        """dist-GEMM-T per group, ``C[:, :, g] = A[:, F_g] @ B[:, F_g]^T``: A stays, B's rows
        move along y (:meth:`lines` of ``[by * Nl/Py, bx, tnb, D/Px]``, one logical row per
        entry, identity = sequence segment), and step ``t``'s partials are chain-reduced along
        x to the column owning the segment each logical row holds
        (:func:`meshrt.ops.estimate.gemm_t_segments`).

        Parameters
        ----------
        a : ndarray
            ``[by, bx, M/Py, D/Px]``.
        labels : ndarray
            ``[by, bx, D/Px, G]`` one-hot group of each local feature.

        Returns
        -------
        Product
            Whose result is ``f32[by, bx, M/Py, N/Px, G]``.
        """
        raise NotImplementedError

    def allreduce(
        self,
        fab: Fabric,
        block: np.ndarray,
        axis: int,
        op: str,
        phases: Callable[[], np.ndarray],
        name: str,
    ) -> np.ndarray:
        """An allreduce along ``axis`` whose result does not depend on its phases: ``phases()``
        runs them as their own messages; a backend may reduce in one sweep per direction
        instead (:func:`meshrt.collectives.line_allreduce`)."""
        raise NotImplementedError


#: Every mover, by name.
MOVERS: dict[str, Mover] = {}


def register_mover(cls: type[Mover]) -> type[Mover]:
    """Class decorator: add an instance of ``cls`` to :data:`MOVERS` under ``cls.name``."""
    MOVERS[cls.name] = cls()
    return cls


def emulations() -> tuple[str, ...]:
    """The names of the movers (the choices of ``--emulation``)."""
    return tuple(MOVERS)


def mover_of(which: str | Mover | None = None) -> Mover:
    """The mover named ``which`` (``None``: :data:`DEFAULT_EMULATION`), or ``which`` itself."""
    if isinstance(which, Mover):
        return which
    name = DEFAULT_EMULATION if which is None else which
    if name not in MOVERS:  # the backends register on ``import meshrt``
        raise ValueError(f"unknown emulation {name!r}; use one of {', '.join(MOVERS)}")
    return MOVERS[name]


__all__ = [
    "DEFAULT_EMULATION",
    "MOVERS",
    "LineTiles",
    "Mover",
    "Product",
    "emulations",
    "mover_of",
    "register_mover",
]
