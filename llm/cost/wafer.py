"""Placement of a model on the wafer: pipeline stages, their regions, and the KV cache they hold.

A phase (prefill or decode) runs on a ``Py x Px`` mesh of cores. When one mesh cannot hold the
phase's weights, its KV budget and its working buffers in ``mem_per_core`` bytes per core, the
layers are split over ``S`` *stages*, each a ``Py x Px`` region of its own (the paper's layer
pipeline, §7.5: "48 KB per core rules out full tensor parallelism ... up to 5x
under-utilisation"). A token visits the stages in turn (batch 1, no overlap), so the time per
token is the sum over stages plus the transfers between them.

Sizes are what the wafer stores: fp16 (``device.word_bytes``) tiles of ``ceil(rows / Py) x
ceil(cols / Px)`` elements, with no padding beyond that (the emulator's even-segment padding
is not carried). Per core and per layer:

* weights: QKV, O, gate/up and down tiles, two RMSNorm weight segments, biases if any;
* the KV cache: one token adds ``2 ceil(kv / Px)`` elements per layer to every core of the row
  holding it;
* working buffers: the phase's activation tiles (see :func:`buffer_words`);
* ``device.reserved_bytes``: code, fabric queues and kernel scratch (calibrated on the paper's
  KV-capacity point, :mod:`llm.cost.calibration`).

The decode phase keeps no embedding table of an untied model: the host knows the token it
picked and streams that one row in (the paper's decode code has no embedding either); the LM
head stays on the last stage. Prefill keeps the table on its first stage (the lookup runs on the
mesh).

Regions are packed on the device's fabric (``cores_y x cores_x``) in shelves, prefill first,
then decode. When the regions of both phases fit together they coexist and the weights need no
re-placement at the switch; otherwise decode takes over the prefill cores and the weights are
re-placed over the fabric (priced by the hand-off in :mod:`llm.cost.estimate`). A phase whose stages
do not fit one wafer is priced as the paper measured CodeLLaMA-34B and QWen2-72B: its layers
are run on one wafer a subset at a time and the cost is scaled per layer
(``method = "layer-subset"``); ``wafers`` reports how many wafers would hold the model at once.
The links between wafers are not priced (:data:`INTER_WAFER_NOTE`, stated in ``method``): a
hand-over that would cross to another wafer costs what the on-wafer hand-over to the adjacent
region costs, which is what a one-wafer layer-subset measurement contains.
A mesh larger than the fabric, or a layer that alone does not fit a core, is a
:class:`PlacementError`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from meshrt.plmr import Device

from ..modeling.config import ModelConfig
from ..placement.layout import mesh_pair

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
# Stages and regions
# ----------------------------------------------------------------------------------------------


@dataclass
class Stage:
    """One pipeline stage: consecutive layers on one ``Py x Px`` region.

    ``origin`` is the region's top-left core ``(y, x)`` on its wafer (``wafer`` 0-based), or
    ``None`` when the phase is priced as a layer subset and the stage is not placed at once.
    """

    first_layer: int
    layers: int
    weight_bytes: int  # per core
    kv_bytes: int  # per core, the phase's KV budget
    buffer_bytes: int  # per core
    free_bytes: int  # per core, after everything above and the reserve
    origin: tuple[int, int] | None = None
    wafer: int = 0


@dataclass
class PhasePlacement:
    """Stages of one phase. ``kv_tokens`` is the cache budget each stage reserves."""

    phase: str
    mesh: tuple[int, int]
    kv_tokens: int
    stages: list[Stage] = field(default_factory=list)
    wafers: int = 1
    method: str = "placed"

    @property
    def cores(self) -> int:
        return self.mesh[0] * self.mesh[1]

    def summary(self) -> dict:
        return {
            "mesh": list(self.mesh),
            "stages": len(self.stages),
            "wafers": self.wafers,
            "method": self.method,
            "kv_tokens": self.kv_tokens,
            "layers_per_stage": [s.layers for s in self.stages],
            "weight_bytes_per_core": [s.weight_bytes for s in self.stages],
            "free_bytes_per_core": [s.free_bytes for s in self.stages],
            "origins": [None if s.origin is None else [s.wafer, *s.origin] for s in self.stages],
        }


def split_layers(layers: int, stages: int) -> list[int]:
    """Layers per stage, as even as possible, the larger stages first."""
    base, extra = divmod(layers, stages)
    return [base + (i < extra) for i in range(stages)]


def stage_stack(
    config: ModelConfig,
    mesh: tuple[int, int],
    device: Device,
    phase: str,
    tokens: int,
    kv_tokens: int,
) -> list[Stage]:
    """The fewest stages whose every core holds its weights, KV budget, buffers and reserve.

    ``tokens``: prompt length (prefill) or cached positions (decode) for the buffers;
    ``kv_tokens``: cache budget (prefill: the prompt; decode: prompt + new tokens).
    """
    py, px = mesh
    if py > device.cores_y or px > device.cores_x:
        raise PlacementError(
            f"{phase} mesh {py}x{px} is larger than the {device.name} fabric "
            f"({device.cores_y}x{device.cores_x} usable cores)"
        )
    wb, mem = device.word_bytes, device.mem_per_core
    per_layer = layer_weight_words(config, mesh) * wb
    table = table_words(config, mesh) * wb
    buffers = buffer_words(config, mesh, phase, tokens) * wb
    kv_rows = _cd(kv_tokens, py) if kv_tokens else 0  # prompt rows (prefill) or shift fill
    kv_layer = kv_rows * kv_token_words(config, mesh, 1) * wb
    first_table = table if phase == "prefill" or config.tie_word_embeddings else 0
    last_table = table if phase == "decode" else 0
    for n in range(1, config.num_layers + 1):
        split = split_layers(config.num_layers, n)
        stages, start = [], 0
        for i, layers in enumerate(split):
            w = (
                layers * per_layer
                + (first_table if i == 0 else 0)
                + (last_table if i == n - 1 and not (i == 0 and first_table) else 0)
            )
            kv = layers * kv_layer
            free = mem - device.reserved_bytes - w - kv - buffers
            stages.append(Stage(start, layers, int(w), int(kv), int(buffers), int(free)))
            start += layers
        if all(s.free_bytes >= 0 for s in stages):
            return stages
    need = per_layer + kv_layer + buffers + device.reserved_bytes
    raise PlacementError(
        f"{phase} on {py}x{px}: one layer alone needs {need / 1024:.1f} KiB per core "
        f"(weights {per_layer / 1024:.1f}, KV {kv_layer / 1024:.1f}, buffers "
        f"{buffers / 1024:.1f}, reserve {device.reserved_bytes / 1024:.1f}) of the "
        f"{mem / 1024:.0f} KiB a {device.name} core has"
    )


class Shelves:
    """Shelf packing of rectangles on a ``height x width`` fabric (first fit, top to bottom)."""

    def __init__(self, height: int, width: int):
        self.height, self.width = height, width
        self.shelves: list[list[int]] = []  # [y, shelf height, next free x]

    def place(self, h: int, w: int) -> tuple[int, int] | None:
        if h > self.height or w > self.width:
            return None
        for shelf in self.shelves:
            y, sh, x = shelf
            if h <= sh and x + w <= self.width:
                shelf[2] = x + w
                return y, x
        y = sum(s[1] for s in self.shelves)
        if y + h > self.height:
            return None
        self.shelves.append([y, h, w])
        return y, 0


def transfer_cost(
    phase: PhasePlacement, a: Stage, b: Stage, config: ModelConfig, tokens: int
) -> dict:
    """Record arguments of handing a phase's activations from stage ``a`` to stage ``b``.

    Every core sends its tile to the core at the same position of the next region along a
    pre-routed path (no software routing stage): ``hops`` is the offset between the regions.
    Decode moves the Y-vector (each row's segment; the ``Px`` columns carry ``Py`` segments);
    prefill moves the ``T x hidden`` activation tile, a column's ``ceil(T/Py)`` rows each
    crossing that column's link.

    A hand-over between stages on different wafers (``inter_wafer``) is priced as the hand-over
    to the adjacent region below on one wafer: that is what the paper's measurement of a model
    larger than a wafer contains (a layer subset run on one wafer, scaled per layer, §7 setup).
    The wafer-to-wafer link itself is not priced: the paper gives no figure for it (no
    multi-wafer run), and no allowed calibration point could fix one; see
    :data:`INTER_WAFER_NOTE`.
    """
    py, px = phase.mesh
    h = config.hidden_size
    inter = a.wafer != b.wafer
    if a.origin is None or b.origin is None or inter:
        hops = py  # a layer subset (or the next wafer) priced as the adjacent region below
    else:
        hops = abs(a.origin[0] - b.origin[0]) + abs(a.origin[1] - b.origin[1])
    if phase.phase == "decode":
        words = _cd(py, px) * _cd(h, py)
    else:
        words = _cd(tokens, py) * py * _cd(h, px)
    return {"words": words, "hops": hops, "routings": 0, "inter_wafer": inter}


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


def place_phase(config, device, mesh, phase, tokens, kv_tokens, shelves) -> PhasePlacement:
    pl = PhasePlacement(
        phase,
        mesh_pair(mesh),
        kv_tokens,
        stage_stack(config, mesh_pair(mesh), device, phase, tokens, kv_tokens),
    )
    regions = []
    for _ in pl.stages:
        spot = shelves.place(*mesh)
        if spot is None:
            break
        regions.append(spot)
    if len(regions) == len(pl.stages):
        for s, r in zip(pl.stages, regions):
            s.origin = r
    else:
        # does not fit one wafer next to what is placed: fresh wafers, regions per wafer
        per = max(1, (device.cores_y // mesh[0]) * (device.cores_x // mesh[1]))
        pl.wafers = math.ceil(len(pl.stages) / per)
        pl.method = "layer-subset"
        fresh = Shelves(device.cores_y, device.cores_x)
        for i, s in enumerate(pl.stages):
            if i % per == 0:
                fresh = Shelves(device.cores_y, device.cores_x)
            s.origin, s.wafer = fresh.place(*mesh), i // per
    return pl


def place(
    config: ModelConfig,
    device: Device,
    prefill_mesh: tuple[int, int],
    decode_mesh: tuple[int, int],
    prompt: int,
    new_tokens: int,
) -> RunPlacement:
    """Stages and regions of a run: a ``prompt``-token prefill then ``new_tokens`` decodes.

    Raises
    ------
    PlacementError
        A mesh larger than the fabric, or one layer that does not fit a core.
    """
    shelves = Shelves(device.cores_y, device.cores_x)
    pre = place_phase(config, device, prefill_mesh, "prefill", prompt, prompt, shelves)
    if pre.method != "placed":
        shelves = Shelves(device.cores_y, device.cores_x)
    context = prompt + new_tokens
    together = Shelves(device.cores_y, device.cores_x)
    together.shelves = [list(s) for s in shelves.shelves]
    dec = place_phase(config, device, decode_mesh, "decode", context, context, together)
    coexist = pre.method == "placed" and dec.method == "placed"
    if not coexist:  # decode takes the whole wafer after the switch
        dec = place_phase(
            config,
            device,
            decode_mesh,
            "decode",
            context,
            context,
            Shelves(device.cores_y, device.cores_x),
        )
    return RunPlacement(config, device, pre, dec, coexist)


def stage_transfers(pl: PhasePlacement, config: ModelConfig, tokens: int) -> list[dict]:
    """Costs of the ``S - 1`` hand-overs between consecutive stages."""
    return [transfer_cost(pl, a, b, config, tokens) for a, b in zip(pl.stages, pl.stages[1:])]


def kv_capacity(
    config: ModelConfig, device: Device, decode_mesh: tuple[int, int], wafers: int | None = None
) -> dict:
    """Longest context the decode cache can hold, for the shift and concat policies.

    The decode weights, buffers and reserve of every stage are subtracted from the memory of
    every usable core of the wafer(s); the rest holds the cache. With the shift policy a stage's
    rows hand their oldest entries to adjacent cores, so the cache fills every free core; a
    token costs ``2 ceil(kv/Px)`` elements per layer on each of ``Px`` cores. With concat every
    new token joins the same row of each stage, so only ``1/Py`` of that memory is usable.
    """
    py, px = decode_mesh
    wb = device.word_bytes
    stages = stage_stack(config, mesh_pair(decode_mesh), device, "decode", 1, 0)
    n = wafers or max(
        1, math.ceil(len(stages) / max(1, (device.cores_y // py) * (device.cores_x // px)))
    )
    pool = n * device.cores_x * device.cores_y * (device.mem_per_core - device.reserved_bytes)
    used = sum(s.weight_bytes + s.buffer_bytes for s in stages) * py * px
    per_token = kv_token_words(config, decode_mesh, config.num_layers) * wb * px
    tokens = max(0.0, (pool - used) / per_token)
    return {
        "shift": int(tokens),
        "concat": int(tokens / py),
        "exact_shift": tokens,
        "wafers": n,
        "free_bytes": pool - used,
        "bytes_per_token": per_token,
    }
