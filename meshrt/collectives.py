"""Reductions and broadcasts along the lines of the mesh, built only from the fabric.

A *line* is a row (``axis=1``, cores ``(py, 0..Px-1)``) or a column (``axis=0``). Every function
takes a rank block ``f32[by, bx, *vec]`` and works on all lines of the block at once.

On the wafer these are pipelined streams: a chain reduce passes a vector core to core, each core
adding its own as the words go by; a broadcast is a router multicast. The emulation computes the
same result with numpy over each rank's block and passes one *carry* per line across each rank
boundary the stream crosses, to the Cartesian neighbour only. The ledger prices the wafer's
schedule in closed form (``*_cost`` functions below, shared with the analytic estimators):

==================  ========================================  ============  ====================
collective          hops on the critical path                 routings      routes per core
==================  ========================================  ============  ====================
chain reduce        ``d = max(r, N-1-r)``                       ``d``         2
broadcast           ``d = max(r, N-1-r)``                       0             2
pipeline allreduce  ``2(N-1)`` (chain to the end, multicast)  ``N-1``       2
ring allreduce      ``2(N-1)`` steps of <= 2 hops              1 per step    3
K-tree allreduce    sum of per-level spans + multicast        ~``K N^(1/K)/2``  ``K+1``
==================  ========================================  ============  ====================
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from .fabric import HI, LO, Fabric
from .plmr import Cost, Ledger

OPS = {"sum": np.add, "max": np.maximum}


def _identity(op: str, dtype):
    if op == "sum":
        return 0
    if op == "max":
        return -np.inf if np.issubdtype(dtype, np.floating) else np.iinfo(dtype).min
    raise ValueError(f"unknown reduction {op!r}; use one of {sorted(OPS)}")


def repeat_view(line: np.ndarray, shape: tuple) -> np.ndarray:
    """Read-only view of ``line`` (``keepdims`` along the reduced axis) repeated to ``shape``;
    what ``np.broadcast_to`` returns, made in one call (collectives return one per
    reduction)."""
    if line.shape == shape:
        out = line.view()
    elif line.flags.c_contiguous and line.ndim == len(shape):
        strides = _repeat_strides(line.shape, shape, line.strides)
        out = np.ndarray(shape, line.dtype, buffer=line, strides=strides)
    else:
        return np.broadcast_to(line, shape)
    out.flags.writeable = False
    return out


@functools.lru_cache(maxsize=1024)
def _repeat_strides(line_shape: tuple, shape: tuple, line_strides: tuple) -> tuple:
    return tuple(0 if n != m else st for n, m, st in zip(line_shape, shape, line_strides))


def _lines_shape(block: np.ndarray, axis: int) -> tuple:
    shape = list(block.shape)
    shape[axis] = 1
    return tuple(shape)


# ----------------------------------------------------------------------------------------------
# Closed-form wafer costs (the ledger and the analytic estimators both use these)
# ----------------------------------------------------------------------------------------------


def _span(n_cores: int, root) -> int:
    r = np.asarray(root)
    return int(np.max(np.maximum(r, n_cores - 1 - r))) if n_cores > 1 else 0


def chain_cost(n_cores: int, root, words: float) -> Cost:
    """A pipelined chain reduce of ``words`` per core toward ``root`` (int or per-line array)."""
    d = _span(n_cores, root)
    return Cost(macs=words if d else 0, words=words, hops=d, routings=d, overlap=True, routes=2)


def broadcast_cost(n_cores: int, root, words: float) -> Cost:
    """A router multicast of ``words`` from ``root`` to every core of the line."""
    d = _span(n_cores, root)
    return Cost(words=words if d else 0, hops=d, routes=2)


def ktree_groups(n_cores: int, levels: int = 2, groups: int | None = None) -> list[int]:
    """Group size (in members of the previous level) of each K-tree level.

    ``groups`` (only for two levels) fixes the number of first-level groups, as the paper's code
    does (``group_num``); otherwise every level groups ``ceil(N^(1/K))`` members.
    """
    if n_cores <= 1:
        return []
    if groups is not None:
        if levels != 2:
            raise ValueError("groups= applies to the two-level tree (levels=2)")
        if not 1 <= groups <= n_cores:
            raise ValueError(f"groups={groups} must be between 1 and {n_cores}")
        g1 = math.ceil(n_cores / groups)
        return [g1, math.ceil(n_cores / g1)]
    if levels < 1:
        raise ValueError(f"levels={levels} must be >= 1")
    size = max(2, math.ceil(n_cores ** (1.0 / levels) - 1e-9))
    out: list[int] = []
    members = n_cores
    for _ in range(levels):
        if members <= 1:
            break
        g = members if len(out) == levels - 1 else min(size, members)
        out.append(g)
        members = math.ceil(members / g)
    return out


@functools.lru_cache(maxsize=256)
def ktree_levels(n_cores: int, levels: int = 2, groups: int | None = None) -> list[list[tuple]]:
    """Segments of each K-tree level: ``[(lo, hi, root, members), ...]`` per level.

    Level 1 groups consecutive cores; level ``l`` groups consecutive roots of level ``l-1``. A
    segment spans every core from its first to its last member (pass-through cores included) and
    the segments of one level tile the line. The root is the middle member.
    """
    plan = []
    members = list(range(n_cores))
    bounds = [(i, i) for i in range(n_cores)]  # core span each member stands for
    for g in ktree_groups(n_cores, levels, groups):
        segs, roots, new_bounds = [], [], []
        for k in range(0, len(members), g):
            mem = members[k : k + g]
            lo, hi = bounds[k][0], bounds[min(k + g, len(members)) - 1][1]
            root = mem[len(mem) // 2]
            segs.append((lo, hi, root, tuple(mem)))
            roots.append(root)
            new_bounds.append((lo, hi))
        plan.append(segs)
        members, bounds = roots, new_bounds
    return plan


@functools.lru_cache(maxsize=1024)
def ktree_cost(n_cores: int, words: float, levels: int = 2, groups: int | None = None) -> tuple:
    """Per-phase costs of the K-tree allreduce: one :class:`Cost` per level, then the broadcast."""
    out: list[Cost] = []
    for segs in ktree_levels(n_cores, levels, groups):
        hops = routings = 0
        for _lo, _hi, root, mem in segs:
            i = mem.index(root)
            below, above = mem[:i], mem[i + 1 :]
            hops = max(hops, root - mem[0], mem[-1] - root)
            routings = max(routings, len(below), len(above))
        out.append(
            Cost(
                macs=words if routings else 0,
                words=words,
                hops=hops,
                routings=routings,
                overlap=True,
                routes=len(out) + 2,
            )
        )
    root = ktree_root(n_cores, levels, groups)
    out.append(broadcast_cost(n_cores, root, words))
    return tuple(out)


def ktree_root(n_cores: int, levels: int = 2, groups: int | None = None) -> int:
    plan = ktree_levels(n_cores, levels, groups)
    return plan[-1][0][2] if plan else 0


def ring_cost(n_cores: int, words: float) -> Cost:
    """The ring allreduce: ``2(N-1)`` steps, each moving one ``1/N`` chunk one ring edge."""
    chunk = math.ceil(words / n_cores) if n_cores else 0
    return Cost(
        macs=chunk,
        words=chunk,
        hops=2 if n_cores > 2 else 1,
        routings=1,
        overlap=True,
        count=2 * (n_cores - 1),
        routes=3,
    )


# ----------------------------------------------------------------------------------------------
# The allreduce algorithms: one class each, registered by name
# ----------------------------------------------------------------------------------------------


class AllreduceAlgorithm:
    """One allreduce algorithm: its closed-form phases and its emulation.

    Adding an algorithm is one subclass decorated with :func:`register_allreduce`; the
    command-line choices (``--allreduce``, ``meshrt bench --algos``) come from
    :data:`ALLREDUCES`.
    """

    #: The name ``--allreduce`` takes.
    name: ClassVar[str] = ""
    #: Whether the spec's ``groups`` and ``levels`` apply.
    tree: ClassVar[bool] = False
    #: Other names it answers to (the paper's).
    aliases: ClassVar[tuple[str, ...]] = ()

    def phases(self, spec: AllreduceSpec, n_cores: int, words: float) -> tuple:
        """``((ledger suffix, Cost), ...)`` of one allreduce of ``words`` per core over
        ``n_cores`` (suffix ``""``: the allreduce's own name)."""
        raise NotImplementedError

    def run(self, fab: Fabric, block, axis: int, op: str, spec: AllreduceSpec, name: str):
        """The allreduce of ``block`` along ``axis`` on the fabric, unrecorded."""
        raise NotImplementedError


#: Every allreduce algorithm, by name, in the order registered.
ALLREDUCES: dict[str, AllreduceAlgorithm] = {}


def register_allreduce(cls: type[AllreduceAlgorithm]) -> type[AllreduceAlgorithm]:
    """Class decorator: add ``cls`` to :data:`ALLREDUCES` under ``cls.name``."""
    ALLREDUCES[cls.name] = cls()
    return cls


def allreduce_name(text: str) -> str:
    """The registered name ``text`` stands for (case and aliases resolved; unknown names are
    returned as given, for the caller to refuse)."""
    key = text.strip().lower()
    for name, algo in ALLREDUCES.items():
        if key in algo.aliases:
            return name
    return key


def allreduce_names() -> str:
    """``"ktree (meshgemv), pipeline, ring"``: the names and their aliases, for messages."""
    return ", ".join(
        f"{n} ({', '.join(a.aliases)})" if a.aliases else n for n, a in ALLREDUCES.items()
    )


@register_allreduce
class KTreeAllreduce(AllreduceAlgorithm):
    """MeshGEMV's K-level tree of grouped chain reduces, then a multicast from the root."""

    name = "ktree"
    tree = True
    aliases = ("meshgemv",)

    def phases(self, spec, n_cores, words):
        costs = ktree_cost(n_cores, words, spec.levels, spec.groups)
        return tuple(
            ("/broadcast" if i == len(costs) - 1 else f"/level{i + 1}", c)
            for i, c in enumerate(costs)
        )

    def run(self, fab, block, axis, op, spec, name):
        return ktree_allreduce(fab, block, axis, op, spec.levels, spec.groups, False, name)


@register_allreduce
class PipelineAllreduce(AllreduceAlgorithm):
    """A chain reduce to the line's last core, then a multicast back."""

    name = "pipeline"

    def phases(self, spec, n_cores, words):
        return (
            ("/reduce", chain_cost(n_cores, n_cores - 1, words)),
            ("/broadcast", broadcast_cost(n_cores, n_cores - 1, words)),
        )

    def run(self, fab, block, axis, op, spec, name):
        n = fab.layout.cores(axis)
        red = reduce_to_root(fab, block, axis, n - 1, op, False, name + "/reduce")
        return broadcast(fab, red, axis, n - 1, False, name + "/broadcast")


@register_allreduce
class RingAllreduce(AllreduceAlgorithm):
    """Reduce-scatter, then all-gather, on the interleaved two-hop ring."""

    name = "ring"

    def phases(self, spec, n_cores, words):
        return (("", ring_cost(n_cores, words)),)

    def run(self, fab, block, axis, op, spec, name):
        return ring_allreduce(fab, block, axis, op, False, name)


@dataclass(frozen=True)
class AllreduceSpec:
    """Which allreduce every reduction of a run uses.

    Parameters
    ----------
    algo : str
        A name in :data:`ALLREDUCES`: ``ktree`` (MeshGEMV's K-level tree, then a multicast from
        the tree root), ``pipeline`` (chain reduce to the last core, then multicast back),
        ``ring`` (reduce-scatter and all-gather on the interleaved two-hop ring).
    groups : int, optional
        Tree algorithms only: number of first-level groups (the paper's ``group_num``; two
        levels).
    levels : int
        Tree algorithms only: tree levels ``K``.
    """

    algo: str = "ktree"
    groups: int | None = None
    levels: int = 2

    def __post_init__(self):
        if self.algo not in ALLREDUCES:
            raise ValueError(
                f"unknown allreduce algorithm {self.algo!r}; use one of {', '.join(ALLREDUCES)}"
            )
        if ALLREDUCES[self.algo].tree and self.groups is not None and self.levels != 2:
            raise ValueError("groups= applies to the two-level tree (levels=2)")

    @classmethod
    def of(cls, algo: str, groups: int | None = None, levels: int = 2) -> AllreduceSpec:
        """The spec of ``algo``, with the tree settings only if ``algo`` is a tree."""
        if algo in ALLREDUCES and not ALLREDUCES[algo].tree:
            return cls(algo)
        return cls(algo, groups, levels)

    @property
    def algorithm(self) -> AllreduceAlgorithm:
        return ALLREDUCES[self.algo]

    def costs(self, n_cores: int, words: float) -> list[tuple[str, Cost]]:
        """``(phase, cost)`` of one allreduce of ``words`` per core over ``n_cores``; the phase
        is appended to the allreduce's ledger name (``""``: the name itself)."""
        return [(phase[1:], cost) for phase, cost in self._costs(n_cores, words)]

    @functools.lru_cache(maxsize=4096)  # noqa: B019 (specs are few, frozen and long-lived)
    def _costs(self, n_cores: int, words: float) -> tuple:
        return self.algorithm.phases(self, n_cores, words)

    def charge(self, ledger: Ledger, n_cores: int, words: float, name: str) -> None:
        """Write into ``ledger`` exactly what :func:`allreduce` records under ``name`` (one
        kernel: ``name``, or the kernel it is part of)."""
        with ledger.running(name):
            for phase, cost in self._costs(n_cores, words):
                ledger.charge(name + phase, cost)


KTREE = AllreduceSpec()


# ----------------------------------------------------------------------------------------------
# Emulation engines
# ----------------------------------------------------------------------------------------------


def _sweep(
    fab: Fabric,
    axis: int,
    own: np.ndarray | tuple[np.ndarray, np.ndarray],
    ufunc,
    send_up: bool,
    recv_up: bool,
    send_down: bool,
    recv_down: bool,
    name: str,
):
    """Pass a carry up the rank line and another down it; returns ``(from_below, from_above)``.

    ``own`` is this rank's contribution to both carries (or a pair ``(up, down)``). A rank
    receives before it sends, so each sweep is one chain of neighbour messages.
    """
    up_own, down_own = own if isinstance(own, tuple) else (own, own)
    below = fab.recv(up_own.shape, up_own.dtype, axis, LO, op=name) if recv_up else None
    if send_up:
        fab.send(up_own if below is None else ufunc(below, up_own), axis, HI, op=name)
    above = fab.recv(down_own.shape, down_own.dtype, axis, HI, op=name) if recv_down else None
    if send_down:
        fab.send(down_own if above is None else ufunc(above, down_own), axis, LO, op=name)
    return below, above


def _line_total(fab: Fabric, partial: np.ndarray, axis: int, op: str, name: str) -> np.ndarray:
    """Reduce per-rank partials (one per line) over the whole rank line; every rank gets it."""
    ufunc = OPS[op]
    r, nr = fab.coords[axis], fab.layout.ranks(axis)
    if nr == 1:
        return partial
    if nr == 2:  # the two sweeps are one message each way between the same two ranks: at once
        other = fab.exchange(partial, axis, HI if r == 0 else LO, op=name)
        assert other is not None  # two ranks on the line: each is the other's neighbour
        return ufunc(partial, other) if r == 0 else ufunc(other, partial)
    below, above = _sweep(
        fab,
        axis,
        partial,
        ufunc,
        send_up=r < nr - 1,
        recv_up=r > 0,
        send_down=r > 0,
        recv_down=r < nr - 1,
        name=name,
    )
    total = partial
    if below is not None:
        total = ufunc(below, total)
    if above is not None:
        total = ufunc(total, above)
    return total


@dataclass(frozen=True)
class SegmentPlan:
    """What one rank does in one K-tree level along one axis (see :func:`_segment_reduce`),
    worked out once per layout from the level's segments.

    ``starts``: local start of every maximal run of cores on one side of one root (the
    ``reduceat`` offsets); ``roots``: per root in this rank, ``(run index, local core, whether
    the run before is its lower part, whether the run after is its upper part)``; the four flags:
    which carries cross this rank's edges.
    """

    starts: tuple
    roots: tuple
    recv_below: bool
    send_up: bool
    recv_above: bool
    send_down: bool
    # ``starts`` as the index array reduceat takes (made once)
    offsets: np.ndarray = field(init=False, compare=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "offsets", np.asarray(self.starts, np.intp))

    @classmethod
    def of(cls, segs, s0: int, e: int) -> SegmentPlan:
        """The plan of cores ``[s0, e)`` for segments ``(lo, hi, root, ...)`` tiling the line."""

        def side(i):  # -1: below its root, 0: root, +1: above, None: off the mesh
            for lo, hi, root, *_ in segs:
                if lo <= i <= hi:
                    return int(np.sign(i - root))
            return None

        runs = []  # (local start, side) of maximal runs of local cores on one side of one root
        for lo, hi, root, *_ in segs:
            for a, z, kind in ((lo, root - 1, -1), (root, root, 0), (root + 1, hi, +1)):
                a, z = max(a, s0), min(z, e - 1)
                if a <= z:
                    runs.append((a - s0, kind))
        roots = tuple(
            (
                k,
                start,
                k > 0 and runs[k - 1][1] == -1,
                k + 1 < len(runs) and runs[k + 1][1] == +1,
            )
            for k, (start, kind) in enumerate(runs)
            if kind == 0
        )
        return cls(
            starts=tuple(start for start, _ in runs),
            roots=roots,
            recv_below=side(s0 - 1) == -1,  # the segment below runs up into this rank
            send_up=runs[-1][1] == -1,  # ... and on into the next
            recv_above=side(e) == +1,  # the segment above runs down into this rank
            send_down=runs[0][1] == +1,
        )


def _segment_reduce(fab: Fabric, vals: np.ndarray, axis: int, plan: SegmentPlan, op: str, name):
    """Reduce each segment of every line to its root core (:class:`SegmentPlan` of this rank).

    The segments tile the line ``[0, N)``; cores that are not members must already hold the
    identity. Returns an array like ``vals`` holding each segment's result at its root core and
    the identity elsewhere. A segment that straddles a rank boundary passes one carry across it.
    """
    ufunc = OPS[op]
    red = ufunc.reduceat(vals, plan.offsets, axis=axis)
    lead = (slice(None),) * axis  # index of run k along ``axis``: lead + (slice(k, k + 1),)
    n_runs = len(plan.starts)
    first, last = lead + (slice(0, 1),), lead + (slice(n_runs - 1, n_runs),)
    if plan.recv_below:
        got = fab.recv(red[first].shape, red.dtype, axis, LO, op=name)
        assert got is not None  # the segment crosses the edge: a neighbour exists
        red[first] = ufunc(got, red[first])
    if plan.send_up:
        fab.send(red[last], axis, HI, op=name)
    if plan.recv_above:
        got = fab.recv(red[last].shape, red.dtype, axis, HI, op=name)
        assert got is not None
        red[last] = ufunc(red[last], got)
    if plan.send_down:
        fab.send(red[first], axis, LO, op=name)
    out = np.empty(vals.shape, vals.dtype)
    out.fill(_identity(op, vals.dtype))
    for k, start, lower, upper in plan.roots:
        acc = red[lead + (slice(k, k + 1),)]
        if lower:
            acc = ufunc(red[lead + (slice(k - 1, k),)], acc)
        if upper:
            acc = ufunc(acc, red[lead + (slice(k + 1, k + 2),)])
        out[lead + (slice(start, start + 1),)] = acc
    return out


def _root_mask(fab: Fabric, axis: int, root) -> tuple[np.ndarray, np.ndarray]:
    """Per-core ``(idx - root)`` along ``axis`` broadcastable to a block, and the line roots."""
    other = 1 - axis
    idx = fab.index(axis)
    r = np.asarray(root)
    if r.ndim == 0:
        lines = r
        diff = idx - int(r)
        diff = diff[:, None] if axis == 0 else diff[None, :]
    else:
        n_other = fab.layout.cores(other)
        if r.shape != (n_other,):
            raise ValueError(f"per-line roots need shape ({n_other},), got {r.shape}")
        lines = r[fab.index(other)]
        diff = idx[:, None] - lines[None, :] if axis == 0 else idx[None, :] - lines[:, None]
    return diff, lines


# ----------------------------------------------------------------------------------------------
# Public collectives
# ----------------------------------------------------------------------------------------------


def reduce_to_root(
    fab: Fabric,
    block: np.ndarray,
    axis: int,
    root,
    op: str = "sum",
    record: bool = True,
    name: str = "chain_reduce",
) -> np.ndarray:
    """Pipelined chain reduce of every line along ``axis`` to its root core.

    Parameters
    ----------
    block : ndarray
        ``[by, bx, *vec]`` tiles.
    root : int or ndarray
        Global core index along ``axis``; or one root per line (length ``Px`` for ``axis=0``,
        ``Py`` for ``axis=1``, indexed by the global line index).

    Returns
    -------
    ndarray
        Like ``block``: root cores hold the reduction of their line; all other cores hold 0.
    """
    n = fab.layout.cores(axis)
    words = math.prod(block.shape[2:])
    if record:
        fab.ledger.charge(name, chain_cost(n, root, words))
    ufunc = OPS[op]
    ident = _identity(op, block.dtype)
    diff, _ = _root_mask(fab, axis, root)
    mask_shape = diff.shape + (1,) * (block.ndim - 2)
    diff = diff.reshape(mask_shape)
    lower = ufunc.reduce(np.where(diff < 0, block, ident), axis=axis, keepdims=True)
    upper = ufunc.reduce(np.where(diff > 0, block, ident), axis=axis, keepdims=True)
    r, nr = fab.coords[axis], fab.layout.ranks(axis)
    if nr > 1:
        below, above = _sweep(
            fab,
            axis,
            (lower, upper),
            ufunc,
            send_up=r < nr - 1,
            recv_up=r > 0,
            send_down=r > 0,
            recv_down=r < nr - 1,
            name=name,
        )
        if below is not None:
            lower = ufunc(below, lower)
        if above is not None:
            upper = ufunc(upper, above)
    total = ufunc(ufunc(lower, block), upper)
    return np.where(diff == 0, total, np.zeros((), block.dtype))


def broadcast(
    fab: Fabric, block: np.ndarray, axis: int, root, record: bool = True, name: str = "broadcast"
) -> np.ndarray:
    """Every core of each line along ``axis`` gets the tile of the line's root core.

    ``root`` is an int or one root per line, as in :func:`reduce_to_root`. The result is a
    read-only view that repeats the line's value along ``axis`` (every core holds the same
    words; the emulator stores them once per rank).
    """
    n = fab.layout.cores(axis)
    if record:
        words = math.prod(block.shape[2:])
        fab.ledger.charge(name, broadcast_cost(n, root, words))
    r = np.asarray(root)
    if r.ndim == 0:  # one root for all lines: the stream flows outward from the root's rank
        return repeat_view(_from_root(fab, block, axis, int(r), name), block.shape)
    diff, _ = _root_mask(fab, axis, root)
    diff = diff.reshape(diff.shape + (1,) * (block.ndim - 2))
    mine = np.where(diff == 0, block, np.zeros((), block.dtype)).sum(
        axis=axis, keepdims=True, dtype=block.dtype
    )
    total = _line_total(fab, mine, axis, "sum", name)
    return repeat_view(total, block.shape)


def _from_root(fab: Fabric, block: np.ndarray, axis: int, root: int, name: str) -> np.ndarray:
    """The root core's tiles of every line (``keepdims`` along ``axis``), on every rank: the
    root's rank sends them both ways and every other rank passes them on, away from the root."""
    b = fab.layout.block(axis)
    owner, r = root // b, fab.coords[axis]
    shape = _lines_shape(block, axis)
    if r == owner:
        sl = [slice(None)] * block.ndim
        sl[axis] = slice(root - fab.origin[axis], root - fab.origin[axis] + 1)
        value = np.ascontiguousarray(block[tuple(sl)])
    else:
        got = fab.recv(shape, block.dtype, axis, HI if r < owner else LO, op=name)
        assert got is not None  # the owner is on that side
        value = got
    if r <= owner:
        fab.send(value, axis, LO, op=name)
    if r >= owner:
        fab.send(value, axis, HI, op=name)
    return value


def allreduce(
    fab: Fabric,
    block: np.ndarray,
    axis: int,
    op: str = "sum",
    spec: AllreduceSpec = KTREE,
    record: bool = True,
    name: str | None = None,
) -> np.ndarray:
    """Every core of each line along ``axis`` gets the reduction of its line (a read-only view
    repeating the line's value along ``axis``, as :func:`broadcast` returns).

    Parameters
    ----------
    spec : AllreduceSpec
        The algorithm (K-tree by default) and its configuration; ledger records are those of
        :meth:`AllreduceSpec.charge` for the block's vector length.
    """
    name = name or f"allreduce_{spec.algo}"
    if record:
        spec.charge(fab.ledger, fab.layout.cores(axis), math.prod(block.shape[2:]), name)
    return spec.algorithm.run(fab, block, axis, op, spec, name)


def ktree_allreduce(
    fab: Fabric,
    block: np.ndarray,
    axis: int,
    op: str = "sum",
    levels: int = 2,
    groups: int | None = None,
    record: bool = True,
    name: str = "allreduce_ktree",
) -> np.ndarray:
    """K-tree allreduce (MeshGEMV): grouped chain reduces level by level, then a multicast.

    The fabric's mover runs it: each level as its own neighbour messages (exact), or each
    rank's partial in one sweep per direction (aggregated, :func:`line_allreduce`); the same
    sum and ledger either way."""
    n = fab.layout.cores(axis)
    if record:
        words = math.prod(block.shape[2:])
        AllreduceSpec("ktree", groups, levels).charge(fab.ledger, n, words, name)
    return fab.mover.allreduce(
        fab,
        block,
        axis,
        op,
        lambda: _ktree_phases(fab, block, axis, op, levels, groups, name),
        name,
    )


def line_allreduce(fab: Fabric, block: np.ndarray, axis: int, op: str, name: str) -> np.ndarray:
    """Any allreduce's result in one sweep of neighbour messages per direction: each rank's
    partial (its cores reduced with numpy) joins the sweep (the aggregated mover's
    :meth:`~meshrt.movers.Mover.allreduce`; the K-tree's own path when one rank holds the
    whole line). A read-only view repeating the line's value along ``axis``; nothing is
    recorded."""
    total = OPS[op].reduce(block, axis=axis, keepdims=True)
    return repeat_view(_line_total(fab, total, axis, op, name), block.shape)


def _ktree_phases(fab, block, axis, op, levels, groups, name) -> np.ndarray:
    """The K-tree's phases, each as its own neighbour messages (when one rank holds the whole
    line there are none: its one sweep is the same sum)."""
    if fab.layout.ranks(axis) == 1:
        return line_allreduce(fab, block, axis, op, name)
    plan = ktree_levels(fab.layout.cores(axis), levels, groups)
    vals = block
    for lvl, segs in enumerate(plan):
        key = ("ktree_level", axis, block.shape[axis], levels, groups, lvl)
        level = fab.plans.get(key)
        if level is None:  # once per layout
            s0 = fab.origin[axis]
            level = fab.plans[key] = SegmentPlan.of(segs, s0, s0 + block.shape[axis])
        vals = _segment_reduce(fab, vals, axis, level, op, f"{name}/level{lvl + 1}")
    root = plan[-1][0][2] if plan else 0
    return broadcast(fab, vals, axis, root, record=False, name=f"{name}/broadcast")


def ring_allreduce(
    fab: Fabric,
    block: np.ndarray,
    axis: int,
    op: str = "sum",
    record: bool = True,
    name: str = "allreduce_ring",
) -> np.ndarray:
    """Ring allreduce on the interleaved two-hop ring: ``N-1`` reduce-scatter steps then ``N-1``
    all-gather steps, each moving one ``1/N`` chunk of the vector one ring edge."""
    from .mesh import ring_pos

    ufunc = OPS[op]
    n = fab.layout.cores(axis)
    vec_shape = block.shape[2:]
    words = math.prod(vec_shape)
    if record:
        fab.ledger.charge(name, ring_cost(n, words))
    if n == 1:
        return block.copy()
    c = -(-words // n)
    flat = block.reshape(block.shape[:2] + (words,))
    chunks = np.zeros(block.shape[:2] + (n, c), dtype=block.dtype)
    chunks.reshape(block.shape[:2] + (n * c,))[..., :words] = flat
    pos = ring_pos(n)[fab.index(axis)]
    pos = pos[:, None] if axis == 0 else pos[None, :]
    pos = np.broadcast_to(pos, block.shape[:2])
    yy, xx = np.indices(block.shape[:2])

    for t in range(n - 1):  # reduce-scatter: send chunk (p - t), receive chunk (p - t - 1)
        out = chunks[yy, xx, (pos - t) % n]
        got = fab.ring_shift(out, axis, op=name)
        k = (pos - t - 1) % n
        chunks[yy, xx, k] = ufunc(chunks[yy, xx, k], got)
    for t in range(n - 1):  # all-gather: core p owns chunk (p + 1) after reduce-scatter
        out = chunks[yy, xx, (pos + 1 - t) % n]
        got = fab.ring_shift(out, axis, op=name)
        chunks[yy, xx, (pos - t) % n] = got
    res = chunks.reshape(block.shape[:2] + (n * c,))[..., :words]
    return res.reshape(block.shape)
