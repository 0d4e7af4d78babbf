"""The PLMR cost model: wafer devices and the ledger every mesh primitive writes to.

The ledger prices what the *wafer* would do, not what the emulator does. All virtual cores run in
lockstep, so one record describes one step of the whole mesh on its critical path: the MACs of the
busiest core, the words it streams over one link, the hops and the software routing stages the
message crosses. Every rank runs the same schedule, so every rank's ledger holds the same figures
and no communication is needed to report them.

Cost of one step (cycles)::

    compute = macs / macs_per_cycle + vectors * vector_setup
    comm    = alpha * hops + beta * routings + words * wavelet_cycles
    step    = step_overhead + (max(compute, comm) if overlap else compute + comm)
              + task_switch * activations   (see below)

Streaming on the wafer is pipelined (a core forwards each word as it arrives), so a message's
length is paid once per step, not once per hop.

Where each term comes from:

* ``macs_per_cycle``: the CE fetches two 32-bit operands per cycle (paper §7 setup); with fp16
  data each operand carries two values, so a vector ``fmach`` retires 2 MACs per cycle.
* ``vectors * vector_setup``: the CE runs local GEMV/GEMM as one vector (DSD) instruction per
  input row (the public CSL code: ``@map`` of ``@fmach`` over the output slice), and each
  instruction pays a set-up and pipeline fill that is not overlapped with the streaming of its
  operands (the paper: "WSE-2 cores cannot fully overlap memory access with compute"). With the
  small tiles of a large mesh this part does not shrink like the MACs do.
* ``wavelet_cycles = ceil(word_bytes / link_bytes_per_cycle)``: a link carries one 32-bit
  wavelet per cycle and the CSL code's fp16 fabric DSDs (``@fmovh``, ``@faddh``) put one
  element in each wavelet, so an fp16 stream moves one element per cycle, not two.
* ``task_switch``: activating a task on a core: the task switch, the set-up of its DSDs and
  the switch to its fabric colours. Paid (a) when a core moves from one kernel to the next
  (RMSNorm, then the QKV GEMV, then the scores, ...: the kernel a record belongs to is the one
  its writer names with :meth:`Ledger.running`, never read from the record's name; recorded as
  ``<kernel>/task_switch``; a kernel repeated back to back, like the paper's GEMV benchmark
  loop, pays none: give the ledger ``kernel=`` the running kernel) and (b) at every step of a
  task-chained kernel (``tasks=1``): MeshGEMM, Cannon, SUMMA and dist-GEMM-T fire each
  compute-shift step from the completion callbacks of the previous one (the public CSL code's
  task chain), while a K-tree allreduce runs its phases as blocking fabric operations inside
  one task.
* ``step_overhead``: a fixed cost per step inside a kernel (default 0: the paper's GEMV points
  only fix ``27 beta + 4 step_overhead`` together, and are attributed to ``beta``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections import defaultdict
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Device:
    """A wafer-scale device as PLMR sees it.

    Parameters
    ----------
    name : str
    cores_x, cores_y : int
        Usable cores per side.
    mem_per_core : int
        Bytes of local SRAM per core (M).
    clock_hz : float
    macs_per_cycle : float
        Multiply-accumulates a core completes per cycle (at ``word_bytes`` precision).
    alpha : float
        Cycles per hop of a pre-routed message (L).
    beta : float
        Cycles per software routing stage: a core that receives, processes and re-sends (L).
    link_bytes_per_cycle : float
        Bytes a neighbour link carries per cycle.
    routing_paths : int
        Routable paths (colours) a core's router supports (R).
    word_bytes : int
        Bytes per stored element (2 for fp16).
    vector_setup : float
        Cycles of set-up per vector (DSD) instruction of local compute, not overlapped.
    step_overhead : float
        Fixed cycles per step inside a kernel.
    task_switch : float
        Cycles of one task activation (task switch, DSD set-up, fabric colour switch): paid
        when a core starts a different kernel and at every step of a task-chained kernel.
    reserved_bytes : float
        Bytes per core not available to weights or KV cache: code, fabric queues, working
        buffers of the kernels.
    """

    name: str
    cores_x: int
    cores_y: int
    mem_per_core: int
    clock_hz: float
    macs_per_cycle: float
    alpha: float
    beta: float
    link_bytes_per_cycle: float = 4.0
    routing_paths: int = 24
    word_bytes: int = 2
    vector_setup: float = 0.0
    step_overhead: float = 0.0
    task_switch: float = 0.0
    reserved_bytes: float = 0.0
    note: str = ""

    def with_(self, **changes) -> Device:
        """A copy with some fields changed (e.g. ``wse2.with_(mem_per_core=96 * 1024)``)."""
        return dataclasses.replace(self, **changes)

    def seconds(self, cycles: float) -> float:
        return cycles / self.clock_hz

    @property
    def wavelet_cycles(self) -> float:
        """Link cycles per streamed element: one element per wavelet, a wavelet per cycle."""
        return float(max(1, -(-self.word_bytes // int(self.link_bytes_per_cycle))))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# WSE-2: 1.1 GHz, 48 KB per core, one 32-bit wavelet per neighbour link per cycle (one fp16
# element per wavelet), 2 fp16 MACs per cycle, 24 routable colours, a 757 x 996 fabric of which
# 750 x 994 is usable (the SDK's fabric offsets). alpha = 1 cycle per hop. beta, vector_setup,
# task_switch and reserved_bytes are fitted on the paper's allowed points (two MeshGEMV times,
# LLaMA3-8B decode on 420x420, LLaMA3-8B KV capacity on 360x360) by llm.cost.calibration.calibrate()
# (tests/llm/cost/test_predict.py re-derives them; `python -m llm estimate --calibration` prints
# them).
WSE2 = Device(
    name="wse2",
    cores_x=750,
    cores_y=994,
    mem_per_core=48 * 1024,
    clock_hz=1.1e9,
    macs_per_cycle=2.0,
    alpha=1.0,
    beta=6.888889,
    link_bytes_per_cycle=4.0,
    routing_paths=24,
    word_bytes=2,
    vector_setup=2.195652,
    step_overhead=0.0,
    task_switch=297.2509,
    reserved_bytes=1554.049,
    note="Cerebras WSE-2: 850k cores, 48 KB SRAM/core, 1.1 GHz, 32-bit links; "
    "beta, vector set-up, kernel switch and reserve calibrated on the paper's "
    "allowed points",
)
# WSE-3: the paper gives no per-core figures ("same NoC, better per-core efficiency and memory");
# the public scripts use a 762 x 1172 fabric. Until measured, it inherits WSE-2's calibration.
WSE3 = WSE2.with_(
    name="wse3",
    cores_x=760,
    cores_y=1170,
    note="Cerebras WSE-3 fabric size; per-core figures as WSE-2 (the paper publishes none)",
)

PRESETS: dict[str, Device] = {"wse2": WSE2, "wse3": WSE3}


def register_device(device: Device) -> None:
    """Make a user-defined device available by name (``--device NAME``)."""
    PRESETS[device.name] = device


def get_device(name_or_device) -> Device:
    """A preset by name, or the device itself. ``name:field=value,...`` overrides fields."""
    if isinstance(name_or_device, Device):
        return name_or_device
    name, _, rest = str(name_or_device).partition(":")
    if name not in PRESETS:
        raise ValueError(f"unknown device {name!r}; presets: {', '.join(sorted(PRESETS))}")
    dev = PRESETS[name]
    if rest:
        changes = {}
        for item in rest.split(","):
            key, _, val = item.partition("=")
            if key not in {f.name for f in dataclasses.fields(Device)} or key == "name":
                raise ValueError(f"device field {key!r} unknown or not settable")
            if key == "note":
                changes[key] = val
                continue
            try:
                number = float(val)
            except ValueError:
                raise ValueError(f"device field {key}={val!r}: not a number") from None
            positive = key in _POSITIVE_FIELDS
            if not (number > 0 if positive else number >= 0):  # also refuses nan
                raise ValueError(
                    f"device field {key}={val}: must be {'> 0' if positive else '>= 0'}"
                )
            if isinstance(getattr(dev, key), int) and not number.is_integer():
                raise ValueError(f"device field {key}={val}: must be a whole number")
            changes[key] = type(getattr(dev, key))(number)
        dev = dev.with_(**changes)
    return dev


# what a device override must keep above 0 (the others: 0 or more)
_POSITIVE_FIELDS = {
    "macs_per_cycle",
    "cores_x",
    "cores_y",
    "mem_per_core",
    "clock_hz",
    "link_bytes_per_cycle",
    "routing_paths",
    "word_bytes",
}


@dataclass(frozen=True)
class Cost:
    """Closed-form wafer cost of ``count`` identical lockstep steps of the mesh.

    The one shape every cost function returns (collectives, kernels, re-layouts, the LLM
    program); :meth:`Ledger.charge` records it. Device-free: cycles come from the ledger.

    Parameters
    ----------
    macs : float
        MACs of the busiest core in one step.
    words : float
        Elements streamed over the critical link in one step.
    hops, routings : int
        Physical hops and software routing stages on one step's critical path.
    overlap : bool
        Whether compute and communication of a step overlap (double buffering).
    count : int
        Number of such steps.
    vectors : int
        Vector (DSD) instructions of local compute in one step (each pays ``vector_setup``).
    tasks : int
        Task activations per step (1 for a task-chained kernel's steps).
    routes : int
        Routing paths per core the steps need configured (0: none noted).

    ``cost * k`` repeats the steps ``k`` times; ``a + b`` adds the counts of two costs of the
    same step (anything else is two different records: charge them apart).
    """

    macs: float = 0.0
    words: float = 0.0
    hops: int = 0
    routings: int = 0
    overlap: bool = False
    count: int = 1
    routes: int = 0
    vectors: int = 0
    tasks: int = 0

    def step(self) -> tuple:
        """The per-step figures that make two costs the same step."""
        return (
            self.macs,
            self.words,
            self.hops,
            self.routings,
            self.overlap,
            self.routes,
            self.vectors,
            self.tasks,
        )

    def __mul__(self, k: int) -> Cost:
        return dataclasses.replace(self, count=self.count * int(k))

    __rmul__ = __mul__

    def __add__(self, other: Cost) -> Cost:
        if not isinstance(other, Cost):
            return NotImplemented
        if self.step() != other.step():
            raise ValueError(f"cannot add costs of different steps: {self} + {other}")
        return dataclasses.replace(self, count=self.count + other.count)

    def with_(self, **changes) -> Cost:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


@dataclass
class OpTotals:
    """Accumulated figures of one named operation."""

    steps: int = 0
    cycles: float = 0.0
    compute_cycles: float = 0.0
    comm_cycles: float = 0.0
    macs: float = 0.0
    words: float = 0.0
    hops: int = 0
    routings: int = 0
    vectors: int = 0
    activations: int = 0


_CHARGE, _MEMORY, _ROUTES, _IO = range(4)


@dataclass
class LedgerTape:
    """The records a piece of work wrote into a :class:`Ledger` (:meth:`Ledger.recording`).

    ``entries``: ``(kind, name relative to the section open at the start, argument)`` in the
    order written; a charge's name is ``(record, kernel)`` and its argument its priced
    increments, so replaying it is only the additions.
    """

    base: int
    device: Device
    entries: list = field(default_factory=list)


@dataclass
class Ledger:
    """Modeled wafer cost of everything the mesh did.

    Parameters
    ----------
    device : Device
    """

    device: Device = WSE2
    ops: dict = field(default_factory=lambda: defaultdict(OpTotals))
    peak_memory: float = 0.0  # bytes per core
    peak_memory_op: str = ""
    max_routes: int = 0  # routing paths per core in use at once
    max_routes_op: str = ""
    io_bytes: float = 0.0  # host <-> wafer edge traffic
    io_cycles: float = 0.0
    kernel: str | None = None  # the kernel the cores run; None: none yet
    # the kernel named by the outermost open running() block (full name), None: none open
    _running: str | None = field(default=None, repr=False, compare=False)
    # what the open sealed() block runs (None: no block open): nothing may be written
    _sealed: str | None = field(default=None, repr=False, compare=False)
    # "a/b/" for the open sections (the prefix of every name recorded now)
    _path: str = field(default="", repr=False, compare=False)
    # step figures -> (total, compute, comm) on _steps_device: a run prices a few hundred
    # distinct steps
    _steps: dict = field(default_factory=dict, repr=False, compare=False)
    _steps_device: Device | None = field(default=None, repr=False, compare=False)
    # id(cost) -> (cost, device, increments of charge()): costs are frozen and mostly cached
    _priced: dict = field(default_factory=dict, repr=False, compare=False)
    # the tape being recorded (see recording())
    _tape: LedgerTape | None = field(default=None, repr=False, compare=False)
    # a tape's shape: its kinds and charge names in order. Tapes of the same shape (a token's
    # layer records at another KV fill: other costs, the same ops) share one interned tuple.
    # id(tape) -> (tape, shape); shape -> shape
    _tape_shapes: dict = field(default_factory=dict, repr=False, compare=False)
    _shapes: dict = field(default_factory=dict, repr=False, compare=False)
    # (id(shape), section path) -> (shape, ops, each entry's OpTotals and kernel under the path)
    _replays: dict = field(default_factory=dict, repr=False, compare=False)

    # -- recording -------------------------------------------------------------------------
    def _name(self, op: str) -> str:
        return self._path + op

    @contextlib.contextmanager
    def section(self, name: str):
        """Group the records made inside under ``name/`` (e.g. per layer)."""
        outer, self._path = self._path, self._path + name + "/"
        try:
            yield self
        finally:
            self._path = outer

    @contextlib.contextmanager
    def running(self, kernel: str):
        """The records written inside belong to ``kernel`` (under the open sections): the cores
        run it, and pay a task switch when they start it after another kernel. Blocks nest;
        the outermost names the kernel (a GEMV's allreduce is part of the GEMV). A record
        written outside any block is a kernel of its own."""
        if self._running is not None:
            yield self
            return
        self._running = self._path + kernel
        try:
            yield self
        finally:
            self._running = None

    @contextlib.contextmanager
    def sealed(self, what: str):
        """Run ``what`` (code whose records are written by someone else, e.g. kernels run
        unrecorded while their op's kind prices them): any record written inside raises
        ``RuntimeError`` naming it, instead of being added to the figures twice."""
        outer, self._sealed = self._sealed, what
        try:
            yield self
        finally:
            self._sealed = outer

    def _refuse(self, record: str) -> None:
        raise RuntimeError(
            f"ledger record {self._path + record!r} written while the ledger is sealed for "
            f"{self._sealed} (its cost is written by the op's kind: run the kernel with "
            "record=False)"
        )

    def step_cycles(
        self, macs=0.0, words=0.0, hops=0, routings=0, overlap=False, vectors=0
    ) -> tuple:
        """``(total, compute, comm)`` cycles of one step, without recording it.

        ``total`` includes the device's fixed ``step_overhead``; ``compute`` and ``comm`` do not.
        Memoized per device and step figures (the same arithmetic, done once).
        """
        if self._steps_device is not self.device:
            self._steps.clear()
            self._steps_device = self.device
        key = (macs, words, hops, routings, overlap, vectors)
        got = self._steps.get(key)
        if got is None:
            got = self._steps[key] = self._step_cycles(
                macs, words, hops, routings, overlap, vectors
            )
        return got

    def _step_cycles(self, macs, words, hops, routings, overlap, vectors) -> tuple:
        d = self.device
        compute = macs / d.macs_per_cycle + vectors * d.vector_setup
        comm = 0.0
        if words or hops or routings:
            comm = d.alpha * hops + d.beta * routings + words * d.wavelet_cycles
        total = d.step_overhead + (max(compute, comm) if overlap else compute + comm)
        return total, compute, comm

    def record(
        self,
        op: str,
        *,
        macs=0.0,
        words=0.0,
        hops=0,
        routings=0,
        overlap=False,
        count=1,
        vectors=0,
        tasks=0,
    ) -> float:
        """Record ``count`` identical lockstep steps of the mesh; returns their cycles.

        Parameters
        ----------
        macs : float
            MACs of the busiest core in one step.
        words : float
            Elements streamed over the critical link in one step.
        hops, routings : int
            Physical hops and software routing stages on the step's critical path.
        overlap : bool
            Whether compute and communication of the step overlap (double buffering).
        vectors : int
            Vector (DSD) instructions the busiest core issues for ``macs`` in one step (e.g.
            one per input row of a local GEMV); each pays the device's ``vector_setup``.
        tasks : int
            Task activations per step (1 for the steps of a task-chained kernel); the first
            record of a different kernel activates one in any case.
        """
        cost = Cost(
            macs=macs,
            words=words,
            hops=hops,
            routings=routings,
            overlap=overlap,
            count=count,
            vectors=vectors,
            tasks=tasks,
        )
        return self.charge(op, cost)

    def charge(self, op: str, cost: Cost) -> float:
        """Record ``cost`` (its ``count`` steps and its routes) under ``op``; returns cycles.

        What a cost adds is worked out once per cost object (kernels charge the same cached
        costs on every token and layer); :meth:`record` is the same with the figures spelled
        out.
        """
        if self._sealed is not None:
            self._refuse(op)
        got = self._priced.get(id(cost))
        if got is None or got[0] is not cost or got[1] is not self.device:
            if len(self._priced) >= 4096:  # costs made afresh per call: keep the memo bounded
                self._priced.clear()
            got = self._priced[id(cost)] = (cost, self.device, *self._increments(cost))
        name = self._path + op
        kernel = self._running or name
        if self._tape is not None:
            base = self._tape.base
            self._tape.entries.append((_CHARGE, (name[base:], kernel[base:]), got))
        return self._apply(self.ops[name], name, kernel, got)

    def _apply(self, t: OpTotals, name: str, kernel: str, got: tuple) -> float:
        """Add ``got`` to ``t`` (op ``name`` of ``kernel``): a task switch first when the cores
        start another kernel; returns the cycles ``got`` adds, the switches included."""
        (
            cost,
            _,
            steps,
            activations,
            cycles,
            compute,
            comm,
            macs,
            words,
            hops,
            routings,
            vectors,
            ret,
        ) = got
        extra = activations * self.device.task_switch
        if kernel != self.kernel:  # the cores start another kernel: one task switch
            self.kernel = kernel
            sw = self.ops[f"{kernel}/task_switch"]
            sw.activations += 1
            sw.cycles += self.device.task_switch
            extra += self.device.task_switch
        t.steps += steps
        t.activations += activations
        t.cycles += cycles
        t.compute_cycles += compute
        t.comm_cycles += comm
        t.macs += macs
        t.words += words
        t.hops += hops
        t.routings += routings
        t.vectors += vectors
        if cost.routes and cost.routes > self.max_routes:
            self.max_routes, self.max_routes_op = cost.routes, name
        return ret + extra

    def _increments(self, cost: Cost) -> tuple:
        """What :meth:`charge` adds to an op's totals for ``cost``, and the cycles it returns
        before the kernel's task switch."""
        c = cost
        total, compute, comm = self.step_cycles(
            c.macs, c.words, c.hops, c.routings, c.overlap, c.vectors
        )
        n = c.count
        return (
            n,
            c.tasks * n,
            total * n + c.tasks * n * self.device.task_switch,
            compute * n,
            comm * n,
            c.macs * n,
            c.words * n,
            c.hops * n,
            c.routings * n,
            c.vectors * n,
            total * n,
        )

    # -- recording once, replaying many times ------------------------------------------------
    @contextlib.contextmanager
    def recording(self):
        """Record what is written inside into a :class:`LedgerTape` (and write it as usual).

        Names on the tape are relative to the section open at the start, so the tape can be
        replayed under another section (layer ``i`` of a program recorded on layer 0).
        """
        if self._tape is not None:
            raise RuntimeError("a ledger records one tape at a time")
        tape = LedgerTape(len(self._path), self.device)
        self._tape = tape
        try:
            yield tape
        finally:
            self._tape = None

    def replay(self, tape: LedgerTape) -> None:
        """Write ``tape``'s records under the current section, in their order, with the same
        arithmetic as writing them one by one (every figure, task switch and peak the same).

        The first replay of a tape shape under a section writes the records one by one
        (creating the ops in the order live records would); later ones, of any tape of that
        shape, add to the same :class:`OpTotals`, resolved once.
        """
        if tape.device is not self.device:
            raise ValueError("a tape replays only on a ledger of the device it was recorded on")
        if self._tape is not None:
            raise RuntimeError("a ledger does not replay a tape while it records one")
        path = self._path
        shape = self._shape(tape)
        key = (id(shape), path)
        plan = self._replays.get(key)
        if plan is None or plan[0] is not shape or plan[1] is not self.ops:
            for kind, name, arg in tape.entries:
                if kind == _CHARGE:
                    full = path + name[0]
                    self._apply(self.ops[full], full, path + name[1], arg)
                else:
                    self._other(kind, name, arg)
            if len(self._replays) >= 4096:
                self._replays.clear()
            self._replays[key] = (shape, self.ops, self._resolve(tape, path))
            return
        for (kind, name, arg), (t, kernel) in zip(tape.entries, plan[2]):
            if kind == _CHARGE:
                self._apply(t, path + name[0], kernel, arg)
            else:
                self._other(kind, name, arg)

    def _shape(self, tape: LedgerTape) -> tuple:
        """``tape``'s kinds and charge names, interned (worked out once per tape)."""
        got = self._tape_shapes.get(id(tape))
        if got is not None and got[0] is tape:
            return got[1]
        shape = tuple((kind, name if kind == _CHARGE else None) for kind, name, _ in tape.entries)
        if len(self._shapes) >= 4096:
            self._shapes.clear()
        shape = self._shapes.setdefault(shape, shape)
        if len(self._tape_shapes) >= 4096:
            self._tape_shapes.clear()
        self._tape_shapes[id(tape)] = (tape, shape)
        return shape

    def _resolve(self, tape: LedgerTape, path: str) -> tuple:
        """Each entry of ``tape``'s: its charge's :class:`OpTotals` and kernel under ``path``
        (``(None, "")`` for the other kinds)."""
        out = []
        for kind, name, _ in tape.entries:
            charged = kind == _CHARGE
            out.append((self.ops[path + name[0]], path + name[1]) if charged else (None, ""))
        return tuple(out)

    def _other(self, kind: int, name, arg) -> None:
        """A tape's memory, routes or io entry, written again."""
        if kind == _MEMORY:
            self.memory(name, arg)
        elif kind == _ROUTES:
            self.routes(name, arg)
        else:
            self.io(name, arg)

    def memory(self, op: str, words_per_core: float) -> None:
        """Note that ``op`` holds ``words_per_core`` elements per core at its peak."""
        if self._sealed is not None:
            self._refuse(op)
        if self._tape is not None:
            self._tape.entries.append((_MEMORY, self._path[self._tape.base :] + op, words_per_core))
        nbytes = words_per_core * self.device.word_bytes
        if nbytes > self.peak_memory:
            self.peak_memory, self.peak_memory_op = nbytes, self._name(op)

    def routes(self, op: str, paths_per_core: int) -> None:
        """Note that ``op`` needs ``paths_per_core`` routing paths configured on some core."""
        if self._sealed is not None:
            self._refuse(op)
        if self._tape is not None:
            self._tape.entries.append((_ROUTES, self._path[self._tape.base :] + op, paths_per_core))
        if paths_per_core > self.max_routes:
            self.max_routes, self.max_routes_op = paths_per_core, self._name(op)

    def io(self, nbytes: float, edge_links: int = 1) -> None:
        """Host <-> wafer transfer of ``nbytes`` through ``edge_links`` edge links (not mesh
        time)."""
        if self._sealed is not None:
            self._refuse("io")
        if self._tape is not None:
            self._tape.entries.append((_IO, nbytes, edge_links))
        self.io_bytes += nbytes
        self.io_cycles += nbytes / (self.device.link_bytes_per_cycle * max(1, edge_links))

    def reset(self) -> None:
        self.ops.clear()
        self._replays.clear()
        self.kernel = None
        self.peak_memory, self.peak_memory_op = 0.0, ""
        self.max_routes, self.max_routes_op = 0, ""
        self.io_bytes = self.io_cycles = 0.0

    # -- reporting -------------------------------------------------------------------------
    def totals(self, prefix: str = "") -> OpTotals:
        """Sum of all ops whose name starts with ``prefix``."""
        out = OpTotals()
        for name, t in self.ops.items():
            if name.startswith(prefix):
                for f in dataclasses.fields(OpTotals):
                    setattr(out, f.name, getattr(out, f.name) + getattr(t, f.name))
        return out

    @property
    def cycles(self) -> float:
        """``totals().cycles``, the same sum in the same order, without the other fields."""
        return sum((t.cycles for t in self.ops.values()), 0.0)

    @property
    def seconds(self) -> float:
        return self.device.seconds(self.cycles)

    def violations(self) -> list[str]:
        """PLMR constraints the recorded work breaks on this device."""
        out = []
        d = self.device
        if self.peak_memory > d.mem_per_core:
            out.append(
                f"memory: {self.peak_memory / 1024:.1f} KiB per core in "
                f"{self.peak_memory_op} "
                f"exceeds {d.mem_per_core / 1024:.0f} KiB on {d.name}"
            )
        if self.max_routes > d.routing_paths:
            out.append(
                f"routing: {self.max_routes} paths per core in {self.max_routes_op} exceed "
                f"the {d.routing_paths} {d.name} supports"
            )
        return out

    def summary(self) -> dict:
        """Figures as a JSON-ready dict."""
        t = self.totals()
        return {
            "device": self.device.name,
            "cycles": t.cycles,
            "seconds": self.device.seconds(t.cycles),
            "compute_cycles": t.compute_cycles,
            "comm_cycles": t.comm_cycles,
            "macs": t.macs,
            "words": t.words,
            "hops": t.hops,
            "routings": t.routings,
            "peak_memory_bytes": self.peak_memory,
            "max_routes": self.max_routes,
            "io_bytes": self.io_bytes,
            "io_cycles": self.io_cycles,
            "violations": self.violations(),
            "ops": {k: dataclasses.asdict(v) for k, v in sorted(self.ops.items())},
        }

    def report(self) -> str:
        """A human-readable table."""
        lines = [
            f"{'op':40s} {'steps':>7s} {'cycles':>12s} {'compute':>12s} {'comm':>12s} "
            f"{'hops':>8s} {'routings':>8s}"
        ]
        for name, t in sorted(self.ops.items()):
            lines.append(
                f"{name:40s} {t.steps:7d} {t.cycles:12.0f} {t.compute_cycles:12.0f} "
                f"{t.comm_cycles:12.0f} {t.hops:8d} {t.routings:8d}"
            )
        t = self.totals()
        lines.append(
            f"{'total':40s} {t.steps:7d} {t.cycles:12.0f} {t.compute_cycles:12.0f} "
            f"{t.comm_cycles:12.0f} {t.hops:8d} {t.routings:8d}"
        )
        lines.append(
            f"modeled time on {self.device.name}: "
            f"{self.device.seconds(t.cycles) * 1e3:.4f} ms; "
            f"peak memory {self.peak_memory / 1024:.2f} KiB/core; "
            f"routes {self.max_routes}/core"
        )
        for v in self.violations():
            lines.append("VIOLATION " + v)
        return "\n".join(lines)
