"""What each op kind of the layer program costs on the wafer: one object per kind, priced once.

An op kind (:class:`OpKind`) prices an :class:`Op` of a program (:mod:`llm.engine.program`)
from its shapes alone: :meth:`OpKind.cost` writes the op's ledger records (steps, memory,
routes, host I/O) for one :class:`Site` (the phase's layout, the allreduce algorithm, the
pass). Both consumers of a
program charge exactly this:

* the estimator (:mod:`llm.cost.estimate`) on meshes too large to emulate;
* the emulator (:mod:`llm.engine.decode`, :mod:`llm.engine.prefill`), whose kernels and
  collectives only compute and move data (``record=False``); after running a program it
  charges the program here.

So a record has one author, and estimator == emulator holds by construction; the kernels' own
records (:mod:`meshrt.ops`) are tied to the same closed forms by meshrt's tests.

:func:`charge` prices a list of ops; :func:`charge_layers` prices a layer program for every
layer (layer 0 priced, layers 1.. replayed from its :class:`~meshrt.plmr.LedgerTape`: the one
way a layer is repeated).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from meshrt.collectives import AllreduceSpec, broadcast_cost
from meshrt.mesh import Axis, Y
from meshrt.ops.estimate import estimate_meshgemm
from meshrt.ops.gemv import estimate_meshgemv
from meshrt.ops.grouped import estimate_grouped_gemm_t, estimate_grouped_meshgemm
from meshrt.plmr import Cost, Ledger
from meshrt.relayout import fetch_cost

from ..placement.layout import PhaseLayout


@dataclass(frozen=True)
class Site:
    """Where a program is priced.

    Attributes
    ----------
    lay : PhaseLayout
        The phase's layout; its mesh ``(Py, Px)`` is the mesh the ops run on.
    spec : AllreduceSpec
        The allreduce of every reduction.
    run : Pass
        The pass-dependent figures (cache fill, prompt ids, ...).
    """

    lay: PhaseLayout
    spec: AllreduceSpec
    run: Pass

    @property
    def mesh(self) -> tuple[int, int]:
        return self.lay.py, self.lay.px

    def cores(self, op: Op) -> int:
        """Cores along the mesh axis that ``op``'s reduction or broadcast runs on."""
        if op.axis is None:
            raise ValueError(f"op {op.name!r} ({op.kind}) communicates but names no mesh axis")
        return self.mesh[op.axis]


# ----------------------------------------------------------------------------------------------
# Per-core sizes of each kind (an op's ``dims``)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NoDims:
    """A kind priced without sizes (a residual add, the vocabulary mask)."""


@dataclass(frozen=True)
class RowDims:
    """``rows`` vectors (decode: the batch; prefill: a core's token rows) of ``seg`` features
    per core: a norm, the decode embedding (``rows`` unused there)."""

    seg: int
    rows: int = 1


@dataclass(frozen=True)
class FetchDims:
    """The prefill embedding fetch: ``rows`` token rows per core, ``seg`` features per core,
    ``vocab_rows`` table rows per core (the table is cut along y)."""

    rows: int
    seg: int
    vocab_rows: int


@dataclass(frozen=True)
class GemvDims:
    """MeshGEMV of ``batch`` vectors by ``W[m, n]`` (wafer sizes), the input cut along
    ``input_axis``."""

    m: int
    n: int
    input_axis: Axis
    batch: int = 1


@dataclass(frozen=True)
class GemmDims:
    """MeshGEMM ``[m, k] @ [k, n]`` (wafer sizes)."""

    m: int
    k: int
    n: int


@dataclass(frozen=True)
class GroupedDims:
    """A grouped kernel: ``[m, k] x [k, n]`` in ``groups`` groups (dist-GEMM-T: ``k`` is the
    shared feature size ``d``)."""

    m: int
    k: int
    n: int
    groups: int


@dataclass(frozen=True)
class RopeDims:
    """``rows`` vectors whose ``tq`` query and ``tk`` key features per core are rotated."""

    rows: int
    tq: int
    tk: int


@dataclass(frozen=True)
class CacheDims:
    """Decode attention over the cache: ``tq`` query features per core (``tk`` K/V
    features), ``heads`` query heads, ``batch`` sequences."""

    tq: int = 0
    tk: int = 0
    heads: int = 0
    batch: int = 1


@dataclass(frozen=True)
class SoftmaxDims:
    """``queries`` score lines per core over ``keys`` keys per core (``None``: the decode
    cache's fill, known per pass), ``batch`` sequences."""

    queries: int
    keys: int | None = None
    batch: int = 1


@dataclass(frozen=True)
class SwigluDims:
    rows: int
    tf: int


@dataclass(frozen=True)
class PickDims:
    """The greedy pick of ``batch`` tokens."""

    batch: int = 1


@dataclass(frozen=True)
class LogitsDims:
    """Every prompt token's logits gathered: ``rows`` tokens (padded) by ``vocab``."""

    rows: int
    vocab: int


# ----------------------------------------------------------------------------------------------
# An op, and what a pass of its program depends on
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    """One step of a phase's program.

    Parameters
    ----------
    kind : str
        One of :data:`KINDS`.
    name : str
        Ledger name (inside the layer's section for layer ops).
    inputs, outputs : tuple of str
        Activations read and written.
    axis : Axis, optional
        Mesh axis (:data:`~meshrt.mesh.Y` or :data:`~meshrt.mesh.X`) of the op's reduction.
    dims : frozen dataclass
        Per-core sizes, of the kind's own type (``KINDS[kind].dims``, e.g.
        :class:`GemvDims`); ``None`` sizes come from the pass (e.g. the
        cache fill of a decode step).
    weight, bias : str, optional
        Keys of the op's weight blocks.
    """

    kind: str
    name: str
    inputs: tuple = ()
    outputs: tuple = ()
    axis: Axis | None = None
    dims: Any = NoDims()
    weight: str | None = None
    bias: str | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown op kind {self.kind!r}")
        if not isinstance(self.dims, KINDS[self.kind].dims):
            want = KINDS[self.kind].dims.__name__
            raise TypeError(
                f"op {self.name!r} ({self.kind}): dims must be {want}, not {self.dims!r}"
            )


@dataclass(frozen=True)
class Pass:
    """What one execution of a program depends on beyond the shapes.

    Attributes
    ----------
    fill : int
        Decode: tokens in the fullest cache row after this token's append (attention work).
    shifts : bool or int
        Decode: whether the shift policy moves entries between rows for this token (a batch:
        how many of its sequences' caches do).
    capacity : int
        Decode: cache slots per core (memory figure; a batch: all its caches together).
    token_col : int
        Decode: mesh column holding the input token's embedding row.
    token_cols : tuple of int
        Decode, a batch of sequences: the column of each sequence's input token (``fill`` is
        then the sum of their caches' fullest rows: attention works through each in turn).
    ids : sequence of int
        Prefill: the prompt (its embedding lookup's routes depend on it).
    """

    fill: int = 0
    shifts: bool | int = False
    capacity: int = 0
    token_col: int = 0
    ids: tuple = ()
    token_cols: tuple = ()

    @property
    def columns(self) -> tuple:
        """The input tokens' embedding columns (one per sequence)."""
        return self.token_cols or (self.token_col,)


# ----------------------------------------------------------------------------------------------
# Local work, as a function of per-core sizes
# ----------------------------------------------------------------------------------------------


def norm_costs(rows: int, seg: int) -> dict:
    """RMSNorm of ``rows`` vectors whose ``seg`` features sit on a core: sum of squares, then
    scale (multiply by the inverse RMS and the weight)."""
    return {"sumsq": Cost(macs=rows * seg), "scale": Cost(macs=2 * rows * seg)}


def kv_shift_cost(kv_seg: int, caches: int = 1) -> Cost:
    """The shift policy's move: every row of the run passes one K and one V entry one hop up
    (``caches`` sequences' caches moving at once: each row link carries all their entries)."""
    return Cost(words=2 * kv_seg * caches, hops=1)


def _charge_parts(led: Ledger, name: str, parts: dict) -> None:
    """Charge ``{part: Cost}`` as ``name/part`` (``""``: ``name`` itself)."""
    for part, cost in parts.items():
        led.charge(f"{name}/{part}" if part else name, cost)


# ----------------------------------------------------------------------------------------------
# The kinds
# ----------------------------------------------------------------------------------------------


class OpKind:
    """One kind of op: its name, its cost, and the mesh axis its traffic crosses.

    Subclasses set :attr:`name` and override :meth:`cost`; a kind that moves no data between
    cores and does no priced work (a residual add) keeps the empty cost.
    """

    name: ClassVar[str] = ""
    #: The type of its ops' ``dims``.
    dims: ClassVar[type] = NoDims

    def cost(self, op: Op, led: Ledger, site: Site) -> None:
        """Write ``op``'s records into ``led``."""

    def hops_per_link(self, op: Op, links: tuple[int, int]) -> int:
        """Physical hops per logical link of ``op``'s traffic on a region whose links are
        ``links`` (y, x) long: along its reduction or broadcast axis (1: it moves no data)."""
        return 1 if op.axis is None else links[op.axis]

    def local(self, op: Op, run: Pass) -> dict:
        """``{part: Cost}`` of the op's local (non-kernel) work."""
        return {}


class EmbedBroadcast(OpKind):
    name = "embed_broadcast"
    dims: ClassVar[type] = RowDims

    def cost(self, op, led, site):
        cols = site.run.columns
        led.io(4 * len(cols), 1)  # the token ids enter the wafer
        for col in cols:  # each sequence's row multicast from its own column
            led.charge(op.name, broadcast_cost(site.cores(op), col, op.dims.seg))


class EmbedFetch(OpKind):
    name = "embed_fetch"
    dims: ClassVar[type] = FetchDims

    def cost(self, op, led, site):
        d = op.dims
        ids = np.asarray(site.run.ids, dtype=np.int64)
        led.io(4 * ids.size, 1)  # the token ids enter the wafer
        rows = fetch_cost(ids // d.vocab_rows, np.arange(ids.size) // d.rows, site.cores(op), d.seg)
        led.charge(op.name, rows)


class Norm(OpKind):
    name = "norm"
    dims: ClassVar[type] = RowDims

    def cost(self, op, led, site):
        site.spec.charge(led, site.cores(op), op.dims.rows, f"{op.name}/allreduce")
        _charge_parts(led, op.name, self.local(op, site.run))

    def local(self, op, run):
        return norm_costs(op.dims.rows, op.dims.seg)


class Gemv(OpKind):
    name = "gemv"
    dims: ClassVar[type] = GemvDims

    def cost(self, op, led, site):
        d = op.dims
        estimate_meshgemv(
            d.m,
            d.n,
            site.mesh,
            led.device,
            d.input_axis,
            site.spec,
            batch=d.batch,
            ledger=led,
            name=op.name,
        )

    def hops_per_link(self, op, links):
        return links[op.dims.input_axis]  # the K-tree's axis


class Gemm(OpKind):
    name = "gemm"
    dims: ClassVar[type] = GemmDims

    def cost(self, op, led, site):
        d = op.dims
        estimate_meshgemm(d.m, d.k, d.n, site.mesh, led.device, True, led, op.name)

    def hops_per_link(self, op, links):
        return max(links)  # operands move along x and y in the same steps


class GroupedScores(Gemm):
    name = "grouped_scores"
    dims: ClassVar[type] = GroupedDims

    def cost(self, op, led, site):
        d = op.dims
        estimate_grouped_gemm_t(d.m, d.n, d.k, d.groups, site.mesh, led.device, led, op.name)


class GroupedPv(Gemm):
    name = "grouped_pv"
    dims: ClassVar[type] = GroupedDims

    def cost(self, op, led, site):
        d = op.dims
        estimate_grouped_meshgemm(
            d.m, d.k, d.n, d.groups, site.mesh, led.device, False, led, op.name
        )


class Rope(OpKind):
    name = "rope"
    dims: ClassVar[type] = RopeDims

    def cost(self, op, led, site):
        _charge_parts(led, op.name, self.local(op, site.run))

    def local(self, op, run):
        d = op.dims  # q and k features of every row rotated
        return {"": Cost(macs=2 * d.rows * (d.tq + d.tk))}


class KvAppend(OpKind):
    name = "kv_append"
    dims: ClassVar[type] = CacheDims

    def cost(self, op, led, site):
        lay, run = site.lay, site.run
        led.memory("kv_cache", 2 * lay.config.num_layers * run.capacity * lay.kv // lay.px)
        _charge_parts(led, op.name, self.local(op, run))

    def hops_per_link(self, op, links):
        return links[Y]  # the shift moves entries up the rows

    def local(self, op, run):
        return {"shift": kv_shift_cost(op.dims.tk, int(run.shifts))} if run.shifts else {}


class CacheScores(OpKind):
    name = "cache_scores"
    dims: ClassVar[type] = CacheDims

    def cost(self, op, led, site):
        words = site.run.fill * op.dims.heads  # the wafer reduces the filled slots only
        site.spec.charge(led, site.cores(op), words, f"{op.name}/allreduce")
        _charge_parts(led, op.name, self.local(op, site.run))

    def local(self, op, run):
        # every query feature of the core meets the cached K (or V) feature it shares
        return {"local": Cost(macs=run.fill * op.dims.tq)}


class CachePv(CacheScores):
    name = "cache_pv"

    def cost(self, op, led, site):
        words = op.dims.tq * op.dims.batch
        site.spec.charge(led, site.cores(op), words, f"{op.name}/allreduce")
        _charge_parts(led, op.name, self.local(op, site.run))


class Softmax(OpKind):
    name = "softmax"
    dims: ClassVar[type] = SoftmaxDims

    def cost(self, op, led, site):
        cores, words = site.cores(op), op.dims.queries * op.dims.batch
        site.spec.charge(led, cores, words, f"{op.name}/max")
        site.spec.charge(led, cores, words, f"{op.name}/sum")
        _charge_parts(led, op.name, self.local(op, site.run))

    def local(self, op, run):
        d = op.dims  # scale, subtract the max, exponentiate, normalise: four per score
        keys = run.fill if d.keys is None else d.keys
        return {"local": Cost(macs=4 * d.queries * keys)}


class Swiglu(OpKind):
    name = "swiglu"
    dims: ClassVar[type] = SwigluDims

    def cost(self, op, led, site):
        _charge_parts(led, op.name, self.local(op, site.run))

    def local(self, op, run):
        return {"": Cost(macs=4 * op.dims.rows * op.dims.tf)}


class Add(OpKind):
    name = "add"  # free: no record


class VocabMask(OpKind):
    name = "vocab_mask"  # free: no record


class Argmax(OpKind):
    name = "argmax"
    dims: ClassVar[type] = PickDims

    def cost(self, op, led, site):
        cores, b = site.cores(op), op.dims.batch
        site.spec.charge(led, cores, b, f"{op.name}/value")
        site.spec.charge(led, cores, b, f"{op.name}/index")
        led.io(4 * b, 1)  # the tokens leave the wafer


class PromptLogits(OpKind):
    name = "prompt_logits"
    dims: ClassVar[type] = LogitsDims

    def cost(self, op, led, site):
        d = op.dims  # float32, gathered by the host
        led.io(d.rows * d.vocab * 4, 2 * sum(site.mesh))


#: Every op kind by name.
KINDS: dict[str, OpKind] = {
    k.name: k()
    for k in (
        EmbedBroadcast,
        EmbedFetch,
        Norm,
        Gemv,
        Gemm,
        Rope,
        KvAppend,
        CacheScores,
        GroupedScores,
        Softmax,
        CachePv,
        GroupedPv,
        Add,
        Swiglu,
        VocabMask,
        Argmax,
        PromptLogits,
    )
}


# ----------------------------------------------------------------------------------------------
# Pricing a program
# ----------------------------------------------------------------------------------------------


def charge(ops: list, led: Ledger, site: Site, links: tuple[int, int] = (1, 1)) -> None:
    """Write into ``led`` the records of running ``ops`` at ``site``.

    Parameters
    ----------
    ops : list of Op
        A program from :mod:`llm.engine.program`.
    links : (int, int)
        Physical hops of one logical link along y and x: ``(1, 1)`` on a square region (the
        emulator's mesh); a stage folded onto a rectangle has longer links along one axis
        (:mod:`llm.cost.regions`), and every hop of an op's traffic along that axis costs
        ``alpha`` that many times (:meth:`OpKind.hops_per_link`).
    """
    if links == (1, 1):
        for op in ops:
            with led.running(op.name):  # an op is one kernel: its records' task switches
                KINDS[op.kind].cost(op, led, site)
        return
    base = led.device
    stretched = {f: base.with_(alpha=base.alpha * f) for f in {1, *links}}
    try:
        for op in ops:
            kind = KINDS[op.kind]
            led.device = stretched[kind.hops_per_link(op, links)]
            with led.running(op.name):
                kind.cost(op, led, site)
    finally:
        led.device = base


def charge_layers(
    ops: list, layers: int, led: Ledger, site: Site, links: tuple[int, int] = (1, 1)
) -> None:
    """:func:`charge` a layer program once per layer, under the sections ``layer{i}``.

    Every layer does the same work under its own names, so layer 0 is priced while recording
    a tape and layers 1.. replay it: the same figures as pricing every layer, added in the
    same order, without the pricing.
    """
    if layers <= 0:
        return
    with led.section("layer0"), led.recording() as tape:
        charge(ops, led, site, links)
    for i in range(1, layers):
        with led.section(f"layer{i}"):
            led.replay(tape)
