"""Placement of a model on the wafer: the one place that decides stages, regions, wafers, memory
per core and KV capacity. ``plan``, ``estimate``, ``bench``, ``generate``'s modeled line,
``--breakdown`` and ``make predict`` all read it.

A phase (prefill or decode) computes on a logical ``Py x Px`` mesh. When one mesh cannot hold
the phase's weights, its KV budget and its working buffers in ``mem_per_core`` bytes per core,
the layers are split over *stages* (the paper's layer pipeline, §7.5). A token visits the
stages in turn (batch 1, no overlap), so the time per token is the sum over stages plus the
hand-overs between them.

Sizes are what the wafer stores: fp16 (``device.word_bytes``) tiles of ``ceil(rows / Py) x
ceil(cols / Px)`` elements, with no padding beyond that (the emulator's even-segment padding
is not carried). Per core and per layer:

* weights: QKV, O, gate/up and down tiles, two RMSNorm weight segments, biases if any;
* the KV cache: one token adds ``2 ceil(kv / Px)`` elements per layer to every core of the row
  holding it; the shift policy spreads the tokens over the ``Py`` rows (``ceil(T / Py)`` per
  row), the concat policy adds every token to the same row;
* working buffers: the phase's activation tiles (see :func:`buffer_words`);
* ``device.reserved_bytes``: code, fabric queues and kernel scratch (calibrated on the paper's
  KV-capacity point, :mod:`llm.cost.calibration`).

The decode phase keeps no embedding table of an untied model: the host knows the token it
picked and streams that one row in; the LM head stays on the last stage. Prefill keeps the table
on its first stage (the lookup runs on the mesh).

**Stages and regions.** A phase takes the fewest stages of its mesh whose cores hold their
layers (each stage as many layers as its memory allows, in proportion), and packs their regions
by area on the wafer's usable cores (:class:`~llm.cost.regions.Fabric`): a stage that does not
fit as a square is folded onto a rectangle (:mod:`llm.cost.regions`), and its steps pay the
longer logical links that folding makes. Prefill is placed first, decode beside it: when both
fit they coexist and the weights need no re-placement at the switch; otherwise decode takes the
wafer after the switch and the weights are re-placed over the fabric (priced by the hand-off).

**When the named mesh's stages do not all fit.** Some one-wafer set-ups cannot be equal stages
of the named mesh: LLaMA2-13B decoding on 540x540 needs three stages of 291,600 cores, more than
the wafer's 745,500, yet its weights and cache fill only 80% of the wafer's memory. The wafer
then runs as many stages of the named mesh as fit, and the layers left over go where the phase's
arithmetic says they cost least:

* decode reads every weight once per token, so weights must sit in the cores that use them: the
  layers left over go to *remainder stages*, the largest square logical meshes (no larger than
  the named mesh) that fit the cores that remain, folded if that is what fits. Each holds as
  many layers as its memory allows and runs them at its own mesh's per-layer time;
* prefill multiplies every weight by the whole prompt: the last stage of the named mesh also
  runs the layers left over, their weights (and K/V) kept in the wafer's other cores and
  streamed in one layer at a time over the fabric, overlapped with the previous layer's
  compute (:func:`stream_cycles`). A remainder mesh would compute those layers several times
  slower than the named mesh; streaming costs a few percent of a layer.

**More than one wafer.** Only a phase whose stages cannot be held by one wafer's cores, even
with remainder stages, goes to more wafers. It is priced as the paper measured CodeLLaMA-34B and
QWen2-72B: its layers run on one wafer a subset at a time and the cost is scaled per layer
(``method = "layer-subset"``); ``wafers`` reports how many wafers would hold the model at once.
The links between wafers are not priced (:data:`INTER_WAFER_NOTE`).

**KV capacity.** The longest context a decode placement accepts: the largest ``T`` for which
:func:`place_phase` places the decode phase, with a cache of ``T`` tokens, on as many wafers as
``T = 1`` needs (:func:`kv_capacity`, per policy). It is what the placement itself refuses
beyond, so every command reports the same figure.

A mesh larger than the fabric, or a layer that alone does not fit a core, is a
:class:`PlacementError` naming the sizes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from meshrt.plmr import Device

from ..modeling.config import ModelConfig
from ..placement.layout import mesh_pair
from .regions import Fabric, Region

#: What a multi-wafer prediction leaves out, and why (reported in ``method``).
INTER_WAFER_NOTE = (
    "inter-wafer links excluded: a hand-over between stages on different "
    "wafers is priced as an on-wafer hand-over to the adjacent region, as in a "
    "one-wafer layer-subset measurement; the paper gives no wafer-to-wafer "
    "link figure to price the link itself"
)


class PlacementError(ValueError):
    """A configuration that cannot be placed on the device, with the reason."""


def _cd(a: int, b: int) -> int:
    return -(-a // b)


# ----------------------------------------------------------------------------------------------
# Memory per core
# ----------------------------------------------------------------------------------------------


def layer_weight_words(config: ModelConfig, mesh: tuple[int, int]) -> int:
    """Weight elements one layer stores on each core of a ``Py x Px`` mesh."""
    py, px = mesh
    h, f = config.hidden_size, config.intermediate_size
    q, kv = config.num_heads * config.head_dim, config.kv_size
    words = (
        _cd(h, py) * _cd(q + 2 * kv, px)
        + _cd(q, px) * _cd(h, py)
        + _cd(h, py) * _cd(2 * f, px)
        + _cd(f, px) * _cd(h, py)
        + 2 * _cd(h, py)
    )
    if config.attention_bias:
        words += _cd(q + 2 * kv, px)
    if config.attention_out_bias:
        words += _cd(h, py)
    if config.mlp_bias:
        words += _cd(2 * f, px) + _cd(h, py)
    return words


def table_words(config: ModelConfig, mesh: tuple[int, int]) -> int:
    """Elements of a ``vocab x hidden`` table (embedding or LM head) per core."""
    return _cd(config.vocab_size, mesh[1]) * _cd(config.hidden_size, mesh[0])


def kv_token_words(config: ModelConfig, mesh: tuple[int, int], layers: int) -> int:
    """Elements one cached token adds to each core of its row, over ``layers`` layers."""
    return 2 * layers * _cd(config.kv_size, mesh[1])


def buffer_words(config: ModelConfig, mesh: tuple[int, int], phase: str, tokens: int) -> int:
    """Working activation elements per core.

    Decode: the Y/X vectors of one token (input, normed, residual; fused QKV and gate/up
    outputs and their allreduce partials; the scores of ``tokens`` cached positions).
    Prefill: the activation tiles of ``tokens`` prompt tokens (``ceil(T / Py)`` rows): input,
    normed, Q/K/V, attention output, gate/up, plus MeshGEMM's second A buffer.
    """
    py, px = mesh
    h, f = config.hidden_size, config.intermediate_size
    q, kv = config.num_heads * config.head_dim, config.kv_size
    if phase == "decode":
        vec = 3 * _cd(h, py) + 2 * (_cd(q + 2 * kv, px) + _cd(2 * f, px))
        return vec + 2 * _cd(tokens, py) * config.num_heads
    rows = _cd(tokens, py)
    return rows * (4 * _cd(h, px) + _cd(q + 2 * kv, px) + _cd(q, px) + _cd(2 * f, px))


# ----------------------------------------------------------------------------------------------
# What a stage's cores hold
# ----------------------------------------------------------------------------------------------

#: Remainder stages a one-wafer placement may add after the stages of the named mesh.
MAX_REMAINDER_STAGES = 4


@dataclass(frozen=True)
class Demand:
    """What one phase asks of every core of a stage, as a function of the stage's mesh.

    ``tokens``: prompt length (prefill) or cached positions (decode) for the buffers;
    ``kv_tokens``: cache budget (prefill: the prompt, held by the prefill stages' own rows;
    decode: prompt + new tokens, held in the wafer's pooled free memory, :func:`kv_capacity`);
    ``policy``: the decode cache's ``"shift"`` or ``"concat"``.
    """

    config: ModelConfig
    device: Device
    phase: str
    tokens: int
    kv_tokens: int
    policy: str = "shift"

    def kv_rows(self, mesh: tuple[int, int]) -> int:
        """Cached tokens in the fullest row of a stage's cores."""
        if self.kv_tokens <= 0 or self.phase == "decode":
            return 0  # the decode cache is pooled over the wafer: see kv_pool_bytes
        return _cd(self.kv_tokens, mesh[0])

    def parts(self, mesh: tuple[int, int], first: bool, last: bool) -> dict:
        """Bytes per core: ``layer`` (weights of one layer), ``kv_layer`` (its cache),
        ``tables`` (embedding / LM head the stage holds) and ``buffers``."""
        wb, c = self.device.word_bytes, self.config
        table = table_words(c, mesh) * wb
        first_table = table if self.phase == "prefill" or c.tie_word_embeddings else 0
        last_table = table if self.phase == "decode" else 0
        tables = (first_table if first else 0) + (
            last_table if last and not (first and first_table) else 0
        )
        return {
            "layer": layer_weight_words(c, mesh) * wb,
            "kv_layer": self.kv_rows(mesh) * kv_token_words(c, mesh, 1) * wb,
            "tables": tables,
            "buffers": buffer_words(c, mesh, self.phase, self.tokens) * wb,
        }

    def room(self, mesh: tuple[int, int], first: bool, last: bool) -> float:
        """Bytes per core left for layers once the tables, buffers and reserve are in."""
        p = self.parts(mesh, first, last)
        return self.device.mem_per_core - self.device.reserved_bytes - p["tables"] - p["buffers"]

    def max_layers(self, mesh: tuple[int, int], first: bool, last: bool) -> int:
        """Most layers (weights and cache) a stage on ``mesh`` holds."""
        p = self.parts(mesh, first, last)
        return max(0, int(self.room(mesh, first, last) // (p["layer"] + p["kv_layer"])))

    def stage(self, mesh, first_layer: int, layers: int, first: bool, last: bool, **where) -> Stage:
        p = self.parts(mesh, first, last)
        w = layers * p["layer"] + p["tables"]
        kv = layers * p["kv_layer"]
        free = self.device.mem_per_core - self.device.reserved_bytes - w - kv - p["buffers"]
        return Stage(
            first_layer, layers, tuple(mesh), int(w), int(kv), int(p["buffers"]), int(free), **where
        )

    def one_layer_error(
        self, mesh: tuple[int, int], first: bool = False, last: bool = False
    ) -> PlacementError:
        """Why a stage of ``mesh`` (the first and/or last, with their tables) cannot hold even
        one layer."""
        p = self.parts(mesh, first, last)
        need = p["layer"] + p["kv_layer"] + p["tables"] + p["buffers"] + self.device.reserved_bytes
        d = self.device
        which = {
            (True, True): "one stage with one layer",
            (True, False): "the first stage with one layer",
            (False, True): "the last stage with one layer",
        }.get((first, last), "one layer alone")
        table = ""
        if p["tables"]:
            name = "LM head" if last and self.phase == "decode" else "embedding"
            table = f", {name} table {p['tables'] / 1024:.1f}"
        return PlacementError(
            f"{self.phase} on {mesh[0]}x{mesh[1]}: {which} needs {need / 1024:.1f} KiB per core "
            f"(weights {p['layer'] / 1024:.1f}, KV {p['kv_layer'] / 1024:.1f}{table}, buffers "
            f"{p['buffers'] / 1024:.1f}, reserve {d.reserved_bytes / 1024:.1f}) of the "
            f"{d.mem_per_core / 1024:.0f} KiB a {d.name} core has; a larger mesh spreads it"
        )


def share_layers(layers: int, caps: list[int]) -> list[int] | None:
    """``layers`` over stages holding at most ``caps`` each, in proportion to the caps (equal
    caps: an even split, the larger shares first); ``None`` if they cannot hold them all or
    a stage would hold none."""
    total = sum(caps)
    if total < layers or min(caps, default=0) < 1 or layers < len(caps):
        return None
    exact = [layers * c / total for c in caps]
    share = [max(1, min(c, int(e))) for c, e in zip(caps, exact)]
    order = sorted(range(len(caps)), key=lambda i: (-(exact[i] - int(exact[i])), i))
    while sum(share) < layers:
        for i in order:
            if sum(share) < layers and share[i] < caps[i]:
                share[i] += 1
    while sum(share) > layers:
        i = max(range(len(caps)), key=lambda j: (share[j] - exact[j], j))
        share[i] -= 1
    return share


def _stages_for(demand: Demand, spots: list[tuple]) -> list[Stage] | None:
    """Stages on the fewest leading ``spots`` (``(mesh, region, remainder)``) that hold every
    layer, or ``None``."""
    layers = demand.config.num_layers
    for n in range(1, len(spots) + 1):
        caps = [
            demand.max_layers(mesh, i == 0, i == n - 1) for i, (mesh, _, _) in enumerate(spots[:n])
        ]
        share = share_layers(layers, caps)
        if share is None:
            continue
        out, start = [], 0
        for i, ((mesh, region, rem), k) in enumerate(zip(spots, share)):
            out.append(
                demand.stage(mesh, start, k, i == 0, i == n - 1, region=region, remainder=rem)
            )
            start += k
        return out
    return None


# ----------------------------------------------------------------------------------------------
# Stages and regions
# ----------------------------------------------------------------------------------------------


@dataclass
class Stage:
    """One pipeline stage: consecutive layers on one logical mesh and its region.

    ``region`` is where the stage sits on wafer ``wafer`` (0-based), folded or not;
    ``remainder`` marks a stage on the cores left over after the named mesh's stages;
    ``streamed`` counts the layers (after its own) the stage runs with weights streamed in from
    storage cores (prefill, :func:`_streamed_prefill`).
    """

    first_layer: int
    layers: int
    mesh: tuple[int, int]
    weight_bytes: int  # per core
    kv_bytes: int  # per core, the phase's KV budget
    buffer_bytes: int  # per core
    free_bytes: int  # per core, after everything above and the reserve
    region: Region | None = None
    wafer: int = 0
    remainder: bool = False
    streamed: int = 0  # layers run here whose weights stream in from storage cores

    @property
    def origin(self) -> tuple[int, int] | None:
        return None if self.region is None else (self.region.y, self.region.x)

    @property
    def links(self) -> tuple[int, int]:
        """Physical hops of one logical link along ``(y, x)`` in this stage's region."""
        return (1, 1) if self.region is None else self.region.links

    @property
    def cores(self) -> int:
        return self.mesh[0] * self.mesh[1]

    def describe(self) -> str:
        py, px = self.mesh
        kind = "remainder stage" if self.remainder else "stage"
        fold = "" if self.region is None else f", {self.region.fold.describe()}"
        at = "" if self.region is None else f" at ({self.region.y},{self.region.x})"
        more = f" + {self.streamed} streamed in" if self.streamed else ""
        return f"{kind} {py}x{px}{fold}{at}, wafer {self.wafer}: {self.layers} layers{more}"


@dataclass
class PhasePlacement:
    """Stages of one phase. ``kv_tokens`` is the cache budget each stage reserves."""

    phase: str
    mesh: tuple[int, int]
    kv_tokens: int
    stages: list[Stage] = field(default_factory=list)
    wafers: int = 1
    method: str = "placed"
    policy: str = "shift"
    store_cores: int = 0  # cores holding streamed layers' weights (prefill)

    @property
    def cores(self) -> int:
        """Cores of the named mesh (one stage)."""
        return self.mesh[0] * self.mesh[1]

    @property
    def stage_cores(self) -> int:
        """Cores of every stage together (and of the storage of streamed weights)."""
        return sum(s.cores for s in self.stages) + self.store_cores

    @property
    def remainder(self) -> bool:
        return any(s.remainder for s in self.stages)

    def summary(self) -> dict:
        return {
            "mesh": list(self.mesh),
            "stages": len(self.stages),
            "stage_meshes": [list(s.mesh) for s in self.stages],
            "remainder_stages": sum(s.remainder for s in self.stages),
            "streamed_layers": [s.streamed for s in self.stages],
            "store_cores": self.store_cores,
            "wafers": self.wafers,
            "method": self.method,
            "kv_tokens": self.kv_tokens,
            "cores": self.stage_cores,
            "layers_per_stage": [s.layers for s in self.stages],
            "weight_bytes_per_core": [s.weight_bytes for s in self.stages],
            "kv_bytes_per_core": [s.kv_bytes for s in self.stages],
            "buffer_bytes_per_core": [s.buffer_bytes for s in self.stages],
            "free_bytes_per_core": [s.free_bytes for s in self.stages],
            "origins": [None if s.origin is None else [s.wafer, *s.origin] for s in self.stages],
            "folds": [None if s.region is None else s.region.fold.describe() for s in self.stages],
            "links": [list(s.links) for s in self.stages],
        }


def split_layers(layers: int, stages: int) -> list[int]:
    """Layers per stage, as even as possible, the larger stages first."""
    base, extra = divmod(layers, stages)
    return [base + (i < extra) for i in range(stages)]


def check_mesh(device: Device, mesh: tuple[int, int], phase: str) -> None:
    py, px = mesh
    if py < 1 or px < 1:
        raise PlacementError(f"{phase} mesh {py}x{px} has no cores")
    if py > device.cores_y or px > device.cores_x:
        raise PlacementError(
            f"{phase} mesh {py}x{px} is larger than the {device.name} fabric "
            f"({device.cores_y}x{device.cores_x} usable cores)"
        )


def fewest_stages(demand: Demand, mesh: tuple[int, int]) -> int:
    """Fewest stages of ``mesh`` whose cores hold every layer (regions aside)."""
    layers = demand.config.num_layers
    inner = demand.max_layers(mesh, False, False)
    if inner < 1 and layers > 2:
        raise demand.one_layer_error(mesh)
    for n in range(1, layers + 1):
        caps = [demand.max_layers(mesh, i == 0, i == n - 1) for i in range(n)]
        if share_layers(layers, caps) is not None:
            return n
    # the first or last stage cannot hold its table beside a layer
    if layers == 1 or demand.max_layers(mesh, True, False) < 1:
        raise demand.one_layer_error(mesh, True, layers == 1)
    raise demand.one_layer_error(mesh, False, True)


def _place_on(
    demand: Demand, mesh: tuple[int, int], fabric: Fabric
) -> tuple[list[Stage], int] | None:
    """The phase's stages on the free cores of ``fabric`` (one wafer), committed there, and the
    cores that store streamed weights; or ``None`` when this wafer cannot hold the phase."""
    n = fewest_stages(demand, mesh)
    trial = fabric.copy()
    spots = []
    for _ in range(n):
        region = trial.place(mesh)
        if region is None:
            break
        spots.append((mesh, region, False))
    if not spots:
        return None
    store = 0
    if len(spots) == n:
        stages = _stages_for(demand, spots)
    elif demand.phase == "prefill":  # weights of the layers left over stream in
        stages, store = _streamed_prefill(demand, spots, trial) or (None, 0)
    else:  # decode: remainder stages on the cores left
        side = min(mesh)
        while len(spots) < n + MAX_REMAINDER_STAGES:
            got = trial.largest_square(side)
            if got is None:
                break
            side_s, fold, (y, x) = got
            square = (side_s, side_s)
            if demand.max_layers(square, False, True) < 1:
                break
            spots.append((square, trial.take(y, x, *fold.shape(square), fold), True))
        stages = _stages_for(demand, spots)
    if stages is None:
        return None
    for s in stages:  # commit only the regions used
        r = s.region
        assert r is not None
        fabric.take(r.y, r.x, r.height, r.width, r.fold)
    if store:  # the cores left store the streamed weights: nothing else goes there
        fabric.free = []
    return stages, store


def _streamed_prefill(demand: Demand, spots: list, trial: Fabric) -> tuple[list[Stage], int] | None:
    """Prefill stages of the named mesh that fit, the last also running the layers they cannot
    hold, with those layers' weights and K/V kept in the wafer's other cores and streamed in
    one layer at a time; ``(stages, storage cores)`` or ``None`` if the other cores cannot
    hold them.

    Prefill multiplies every weight by the whole prompt, so bringing a layer's weights over
    the fabric costs little beside its compute (:func:`stream_cycles`), while a smaller
    remainder mesh would compute its layers several times slower.
    """
    mesh, k = spots[0][0], len(spots)
    p = demand.parts(mesh, False, False)
    per_layer = p["layer"] + p["kv_layer"]
    caps = [demand.max_layers(mesh, i == 0, i == k - 1) for i in range(k)]
    # the last stage keeps room for the layer streaming in
    caps[-1] = max(0, int((demand.room(mesh, k == 1, True) - per_layer) // per_layer))
    streamed = demand.config.num_layers - sum(caps)
    if streamed <= 0 or min(caps) < 1:
        return None
    dev = demand.device
    store_cores = trial.height * trial.width - trial.used_cores
    need = streamed * per_layer * mesh[0] * mesh[1]
    if need > store_cores * (dev.mem_per_core - dev.reserved_bytes):
        return None
    stages, start = [], 0
    for i, ((m, region, _), c) in enumerate(zip(spots, caps)):
        stages.append(demand.stage(m, start, c, i == 0, i == k - 1, region=region))
        start += c
    last = stages[-1]
    stages[-1] = dataclasses.replace(
        last,
        streamed=streamed,
        buffer_bytes=last.buffer_bytes + int(per_layer),
        free_bytes=last.free_bytes - int(per_layer),
    )
    used = -(-need // int(dev.mem_per_core - dev.reserved_bytes))
    return stages, int(min(store_cores, used))


def stream_cycles(config: ModelConfig, device: Device, stage: Stage) -> float:
    """Cycles to stream one layer's weights into ``stage`` from the storage cores: the whole
    mesh's weight elements cross the region's shorter side, one element per link per cycle, on
    pre-routed paths up to a wafer's side long."""
    py, px = stage.mesh
    words = layer_weight_words(config, stage.mesh) * py * px
    side = min(stage.region.height, stage.region.width) if stage.region else min(py, px)
    return words / side * device.wavelet_cycles + device.alpha * max(device.cores_y, device.cores_x)


def place_phase(
    config: ModelConfig,
    device: Device,
    mesh,
    phase: str,
    tokens: int,
    kv_tokens: int,
    fabric: Fabric | None = None,
    policy: str = "shift",
) -> PhasePlacement:
    """Stages and regions of one phase, on ``fabric`` (default: a whole wafer).

    On one wafer when its cores can hold the phase (stages of ``mesh``, folded where needed;
    then, for decode, remainder stages, for prefill, layers streamed in from storage cores);
    otherwise as a layer subset over as many wafers as the stages of ``mesh`` need.

    Raises
    ------
    PlacementError
        A mesh larger than the fabric, or one layer that does not fit a core.
    """
    mesh = mesh_pair(mesh)
    check_mesh(device, mesh, phase)
    demand = Demand(config, device, phase, tokens, kv_tokens, policy)
    fab = fabric if fabric is not None else Fabric(device.cores_y, device.cores_x)
    got = _place_on(demand, mesh, fab)
    if got is not None:
        return PhasePlacement(phase, mesh, kv_tokens, got[0], policy=policy, store_cores=got[1])
    # more than one wafer: the named mesh's stages, wafer after wafer
    n = fewest_stages(demand, mesh)
    caps = [demand.max_layers(mesh, i == 0, i == n - 1) for i in range(n)]
    share = share_layers(config.num_layers, caps)
    assert share is not None
    out, start, wafer = [], 0, 0
    fresh = Fabric(device.cores_y, device.cores_x)
    for i, k in enumerate(share):
        region = fresh.place(mesh)
        if region is None:
            wafer, fresh = wafer + 1, Fabric(device.cores_y, device.cores_x)
            region = fresh.place(mesh)
        out.append(demand.stage(mesh, start, k, i == 0, i == n - 1, region=region, wafer=wafer))
        start += k
    return PhasePlacement(
        phase, mesh, kv_tokens, out, wafers=wafer + 1, method="layer-subset", policy=policy
    )


def repack(pl: PhasePlacement, fabric: Fabric) -> PhasePlacement | None:
    """``pl``'s stages (same meshes, same layers) on the free cores of ``fabric``, committed
    there; ``None`` if they do not all fit."""
    if pl.wafers > 1:
        return None
    trial = fabric.copy()
    stages = []
    for s in pl.stages:
        region = trial.place(s.mesh)
        if region is None:
            return None
        stages.append(dataclasses.replace(s, region=region))
    fabric.free, fabric.regions = trial.free, trial.regions
    return dataclasses.replace(pl, stages=stages)


def transfer_cost(
    phase: PhasePlacement, a: Stage, b: Stage, config: ModelConfig, tokens: int
) -> dict:
    """Record arguments of handing a phase's activations from stage ``a`` to stage ``b``.

    Every core sends its tile to the core at the same position of the next region along a
    pre-routed path (no software routing stage): ``hops`` is the offset between the regions.
    Decode moves the Y-vector (each row's segment; the ``Px`` columns carry ``Py`` segments)
    of each of the ``tokens`` sequences decoded together (1 for one request, ``B`` for a
    batched step); prefill moves the ``T x hidden`` activation tile, a column's
    ``ceil(T/Py)`` rows each crossing that column's link.

    A hand-over between stages on different wafers (``inter_wafer``) is priced as the hand-over
    to the adjacent region below on one wafer: that is what the paper's measurement of a model
    larger than a wafer contains (a layer subset run on one wafer, scaled per layer, §7 setup).
    The wafer-to-wafer link itself is not priced; see :data:`INTER_WAFER_NOTE`.
    """
    py, px = a.mesh
    h = config.hidden_size
    inter = a.wafer != b.wafer
    if a.origin is None or b.origin is None or inter:
        hops = py  # the next wafer priced as the adjacent region below
    else:
        hops = abs(a.origin[0] - b.origin[0]) + abs(a.origin[1] - b.origin[1])
    if phase.phase == "decode":
        words = tokens * _cd(py, px) * _cd(h, py)
    else:
        words = _cd(tokens, py) * py * _cd(h, px)
    return {"words": words, "hops": hops, "routings": 0, "inter_wafer": inter}


def stage_transfers(pl: PhasePlacement, config: ModelConfig, tokens: int) -> list[dict]:
    """Costs of the ``S - 1`` hand-overs between consecutive stages.

    ``tokens`` is the prompt length for prefill and the number of sequences decoded together
    (the batch) for decode.
    """
    return [transfer_cost(pl, a, b, config, tokens) for a, b in zip(pl.stages, pl.stages[1:])]


# ----------------------------------------------------------------------------------------------
# The plan of a run
# ----------------------------------------------------------------------------------------------


@dataclass
class RunPlacement:
    """Placement of both phases of a run on ``device``."""

    config: ModelConfig
    device: Device
    prefill: PhasePlacement
    decode: PhasePlacement
    coexist: bool

    @property
    def wafers(self) -> int:
        return max(self.prefill.wafers, self.decode.wafers)

    @property
    def method(self) -> str:
        if self.wafers > 1:
            return (
                "layer-subset: layers priced on one wafer a subset at a time and scaled "
                "per layer (the paper's method for models larger than a wafer); " + INTER_WAFER_NOTE
            )
        return "placed: every stage of both phases on one wafer"

    def summary(self) -> dict:
        return {
            "prefill": self.prefill.summary(),
            "decode": self.decode.summary(),
            "coexist": self.coexist,
            "wafers": self.wafers,
            "method": self.method,
        }


def place_decode(
    config: ModelConfig, device: Device, mesh, context: int, policy: str = "shift"
) -> PhasePlacement:
    """The decode phase alone on the wafer, with a cache of ``context`` tokens."""
    return place_phase(config, device, mesh, "decode", context, context, policy=policy)


def kv_token_bytes(config: ModelConfig, device: Device, mesh: tuple[int, int]) -> int:
    """Bytes one cached token takes over all layers: ``2 ceil(kv / Px)`` elements per layer on
    each of the ``Px`` cores of the row holding it."""
    return kv_token_words(config, mesh, config.num_layers) * device.word_bytes * mesh[1]


def kv_pool_bytes(pl: PhasePlacement, device: Device, taken_cores: int = 0) -> float:
    """Memory the decode cache can use: every usable core of the phase's wafers, less the
    reserve, less what its stages hold (weights, buffers), less ``taken_cores`` cores that
    other regions occupy (prefill's, when the phases coexist)."""
    usable = device.mem_per_core - device.reserved_bytes
    pool = (pl.wafers * device.cores_x * device.cores_y - taken_cores) * usable
    return pool - sum(s.cores * (s.weight_bytes + s.buffer_bytes) for s in pl.stages)


def kv_capacity(config: ModelConfig, device: Device, decode_mesh) -> dict:
    """Longest context the decode phase holds, per cache policy.

    The decode stages placed alone (:func:`place_decode`, one cached token for the buffers)
    leave :func:`kv_pool_bytes` free on their wafers. With the shift policy the cache fills
    that memory, wherever it is: a stage's rows hand their oldest entries to the adjacent row,
    so entries travel on to cores beyond the stage's own (the partial scores of an entry are
    computed where it sits; the longer reduction this implies is not priced). With concat every
    new token joins the same row, so ``1/Py`` of it holds tokens.

    Returns
    -------
    dict
        ``shift``, ``concat`` (tokens), ``exact_shift``, ``wafers``, ``stages``, ``cores``
        (of the stages), ``free_bytes`` (the pool) and ``bytes_per_token``.
    """
    mesh = mesh_pair(decode_mesh)
    pl = place_decode(config, device, mesh, 1)
    free = kv_pool_bytes(pl, device)
    per_token = kv_token_bytes(config, device, mesh)
    tokens = max(0.0, free / per_token)
    return {
        "shift": int(tokens),
        "concat": int(tokens / mesh[0]),
        "exact_shift": tokens,
        "wafers": pl.wafers,
        "stages": len(pl.stages),
        "cores": pl.stage_cores,
        "free_bytes": free,
        "bytes_per_token": per_token,
    }


def place(
    config: ModelConfig,
    device: Device,
    prefill_mesh: tuple[int, int],
    decode_mesh: tuple[int, int],
    prompt: int,
    new_tokens: int,
    policy: str = "shift",
) -> RunPlacement:
    """Stages and regions of a run: a ``prompt``-token prefill then ``new_tokens`` decodes.

    Decode is placed as it would be alone (:func:`place_decode`); the two phases coexist when
    those stages also fit the cores prefill leaves free, and the request's cache fits the
    memory left beside both.

    Raises
    ------
    PlacementError
        A mesh larger than the fabric, or one layer that does not fit a core.
    """
    fabric = Fabric(device.cores_y, device.cores_x)
    pre = place_phase(config, device, prefill_mesh, "prefill", prompt, prompt, fabric)
    dec = place_decode(config, device, decode_mesh, prompt + new_tokens, policy)
    beside = repack(dec, fabric) if pre.wafers == 1 else None
    if beside is not None:
        room = kv_pool_bytes(beside, device, pre.stage_cores)
        if room < (prompt + new_tokens) * kv_token_bytes(config, device, dec.mesh):
            beside = None
    return RunPlacement(config, device, pre, beside or dec, beside is not None)
