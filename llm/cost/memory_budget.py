"""Per-core memory of a model on a wafer: weights, KV cache, and which meshes fit.

Pure arithmetic from :class:`~llm.modeling.config.ModelConfig`,
:class:`~llm.placement.layout.PhaseLayout` and a
:class:`~meshrt.plmr.Device`; no MPI, no weights. What ``python -m llm plan`` prints.

Sizes are the wafer's: ``device.word_bytes`` per stored element (2 for fp16), whatever the
emulator computes in. Activations, code and routing buffers are not counted.
"""

from __future__ import annotations

import math

from meshrt.plmr import Device, get_device

from ..modeling.config import ModelConfig
from ..placement.decode_tiles import decode_tile_shapes
from ..placement.footprint import kv_slot_words, weight_words_per_core
from ..placement.layout import PhaseLayout, mesh_pair
from ..placement.prefill_tiles import prefill_tile_shapes


def phase_memory(
    config: ModelConfig,
    mesh: tuple[int, int],
    device: Device,
    phase: str = "decode",
    kv_memory: int | None = None,
    context: int | None = None,
) -> dict:
    """Per-core memory of one phase on a ``Py x Px`` mesh.

    Parameters
    ----------
    kv_memory : int, optional
        Bytes per core given to the KV cache; default: what the weights leave free.
    context : int, optional
        Tokens the KV cache must hold (shift policy) for the phase to count as fitting.

    Returns
    -------
    dict
        ``weights_bytes`` (total per core) and ``weights_breakdown``; ``kv_slot_bytes`` (one
        token in the core row holding it), ``kv_bytes_per_token`` (averaged over the ``Py``
        rows); ``kv_free_bytes``, ``kv_slots``, ``capacity_shift`` / ``capacity_concat``
        (tokens); ``fits`` and ``reason``.
    """
    lay = PhaseLayout(config, *mesh)
    shapes = decode_tile_shapes(lay) if phase == "decode" else prefill_tile_shapes(lay)
    wb = device.word_bytes
    breakdown = {k: v * wb for k, v in weight_words_per_core(shapes).items()}
    weights = sum(breakdown.values())
    slot = kv_slot_words(lay) * wb
    free = (device.mem_per_core - weights) if kv_memory is None else int(kv_memory)
    slots = max(0, free) // slot
    out = {
        "phase": phase,
        "mesh": list(mesh),
        "cores": mesh[0] * mesh[1],
        "weights_bytes": weights,
        "weights_breakdown": breakdown,
        "kv_slot_bytes": slot,
        "kv_bytes_per_token": slot / mesh[0],
        "kv_free_bytes": free,
        "kv_slots": int(slots),
        "capacity_shift": int(slots * mesh[0]),
        "capacity_concat": int(slots),
    }
    reasons = []
    if weights > device.mem_per_core:
        reasons.append(
            f"weights need {_kib(weights)} per core, over the "
            f"{_kib(device.mem_per_core)} of {device.name}"
        )
    if kv_memory is not None and weights + kv_memory > device.mem_per_core:
        reasons.append(f"weights + {_kib(kv_memory)} of KV exceed the core memory")
    if context is not None and slots * mesh[0] < context:
        reasons.append(
            f"the KV cache holds {slots * mesh[0]} tokens (shift), fewer than the "
            f"{context} asked for"
        )
    if mesh[0] > device.cores_y or mesh[1] > device.cores_x:
        reasons.append(
            f"the mesh is larger than the device ({device.cores_y}x{device.cores_x} cores)"
        )
    out["fits"] = not reasons
    out["reason"] = "; ".join(reasons)
    out.update(pipeline_stages(config, mesh, device, breakdown))
    return out


def pipeline_stages(
    config: ModelConfig, mesh: tuple[int, int], device: Device, breakdown: dict
) -> dict:
    """Layer pipelining when one mesh cannot hold the weights (the paper's way out of M).

    The layers are split over ``S`` meshes of the same shape, consecutive layers per stage; the
    first stage also holds the embedding, the last the LM head. A token visits the stages in
    turn, so each stage idles ``(S-1)/S`` of the time, and the hand-over between stages adds
    to the time per token. This count holds the weights only (the emulator's padded tiles);
    :mod:`llm.cost.wafer` also counts the KV budget, buffers and reserve, places the regions on
    the fabric and prices the hand-overs (``wafer`` in :func:`memory_budget`, ``llm estimate``).

    Returns
    -------
    dict
        ``stages`` (smallest ``S`` whose stages fit, ``None`` if even one layer per stage does
        not), ``stage_weights_bytes``, ``stage_kv_slots`` (KV slots per core left in a stage),
        ``stage_cores`` (``S * Py * Px``) and ``stages_fit_device``.
    """
    layers = config.num_layers
    per_layer = breakdown["layers"] / layers
    ends = max(breakdown["embed"], breakdown["lm_head"]) + breakdown["other"]
    cores = mesh[0] * mesh[1]
    for stages in range(1, layers + 1):
        per_stage = math.ceil(layers / stages)
        weights = per_layer * per_stage + (
            ends if stages > 1 else breakdown["embed"] + breakdown["lm_head"] + breakdown["other"]
        )
        if weights <= device.mem_per_core:
            slot = 2 * per_stage * (PhaseLayout(config, *mesh).kv // mesh[1]) * device.word_bytes
            return {
                "stages": stages,
                "stage_weights_bytes": weights,
                "stage_kv_slots": int((device.mem_per_core - weights) // slot),
                "stage_cores": stages * cores,
                "stages_fit_device": stages * cores <= device.cores_x * device.cores_y,
            }
    return {
        "stages": None,
        "stage_weights_bytes": None,
        "stage_kv_slots": 0,
        "stage_cores": None,
        "stages_fit_device": False,
    }


def smallest_square_mesh(
    config: ModelConfig, device: Device, phase: str = "decode", context: int | None = None
) -> int | None:
    """Smallest side ``s`` such that an ``s x s`` mesh holds the phase's weights and (if given)
    the KV cache of ``context`` tokens; ``None`` if no square mesh on the device does."""
    for side in range(1, min(device.cores_x, device.cores_y) + 1):
        lay = PhaseLayout(config, side, side)
        shapes = decode_tile_shapes(lay) if phase == "decode" else prefill_tile_shapes(lay)
        weights = sum(weight_words_per_core(shapes).values()) * device.word_bytes
        if weights > device.mem_per_core:
            continue
        if context is not None:
            slots = (device.mem_per_core - weights) // (kv_slot_words(lay) * device.word_bytes)
            if slots * side < context:
                continue
        return side
    return None


def memory_budget(
    config: ModelConfig,
    decode_mesh=None,
    prefill_mesh=None,
    device="wse2",
    kv_memory: int | None = None,
    context: int | None = None,
) -> dict:
    """Memory budget of ``config`` on ``device``: the given meshes (or the smallest square ones
    that fit) and the smallest square meshes that fit. See :func:`phase_memory`."""
    dev = get_device(device)
    out = {
        "model": config.name or config.family,
        "family": config.family,
        "layers": config.num_layers,
        "parameters": config.num_parameters(),
        "device": dev.name,
        "device_cores": [dev.cores_y, dev.cores_x],
        "mem_per_core": dev.mem_per_core,
        "word_bytes": dev.word_bytes,
        "context": context,
    }
    smallest = {ph: smallest_square_mesh(config, dev, ph, context) for ph in ("decode", "prefill")}
    out["smallest_square"] = smallest
    largest = min(dev.cores_x, dev.cores_y)
    meshes: dict[str, tuple[tuple[int, int], str]] = {}
    for ph, given in (("decode", decode_mesh), ("prefill", prefill_mesh)):
        if given is not None:
            meshes[ph] = (mesh_pair(given), "given")
        elif ph == "decode" or decode_mesh is None:
            side = smallest[ph] or largest
            meshes[ph] = (
                (side, side),
                "smallest square that fits"
                if smallest[ph]
                else "largest square on the device (nothing fits)",
            )
        else:
            meshes[ph] = (mesh_pair(decode_mesh), "same as decode")
    phases: dict[str, dict] = {}
    out["phases"] = phases
    for ph, (mesh, why) in meshes.items():
        rec = phase_memory(config, mesh, dev, ph, kv_memory, context)
        rec["mesh_choice"] = why
        phases[ph] = rec
    out["fits"] = all(r["fits"] for r in phases.values())
    out["wafer"] = _wafer_placement(
        config, dev, phases["prefill"]["mesh"], phases["decode"]["mesh"], context
    )
    return out


def _wafer_placement(
    config: ModelConfig, device: Device, prefill_mesh, decode_mesh, context: int | None
) -> dict:
    """:func:`llm.cost.wafer.place` of a request filling ``context`` (default 4096) tokens, half
    prompt, half output; the reason when it cannot be placed."""
    from .wafer import PlacementError, kv_capacity, place

    ctx = context or 4096
    try:
        p = place(
            config,
            device,
            tuple(prefill_mesh),
            tuple(decode_mesh),
            max(1, ctx // 2),
            max(1, ctx - ctx // 2),
        )
        out = p.summary()
        out["kv_capacity"] = {
            k: v
            for k, v in kv_capacity(config, device, tuple(decode_mesh), p.decode.wafers).items()
            if k in ("shift", "concat")
        }
        return out
    except PlacementError as e:
        return {"error": str(e)}


def _kib(n: float) -> str:
    return f"{n / 1024:.2f} KiB" if n < 1024 * 1024 else f"{n / 2**20:.2f} MiB"


def format_memory_budget(p: dict) -> str:
    """Human-readable form of :func:`memory_budget`'s result."""
    lines = [
        f"model:  {p['model']} ({p['family']}), {p['layers']} layers, "
        f"{p['parameters'] / 1e6:.1f} M parameters",
        f"device: {p['device']}, {p['device_cores'][0]}x{p['device_cores'][1]} cores, "
        f"{p['mem_per_core'] / 1024:.0f} KiB per core, {p['word_bytes']}-byte words",
    ]
    for ph, r in p["phases"].items():
        py, px = r["mesh"]
        b = r["weights_breakdown"]
        lines += [
            f"{ph} mesh {py}x{px} ({r['cores']} cores; {r['mesh_choice']}):",
            f"  weights per core: {_kib(r['weights_bytes'])} = "
            f"embed {_kib(b['embed'])} + lm_head {_kib(b['lm_head'])} + layers "
            f"{_kib(b['layers'])} + other {_kib(b['other'])}",
            f"  KV per token: {r['kv_slot_bytes']} B on each core of the row holding it, "
            f"{r['kv_bytes_per_token']:.2f} B per core averaged over {py} rows",
            f"  KV memory per core: {_kib(max(0, r['kv_free_bytes']))} -> {r['kv_slots']} slots: "
            f"capacity {r['capacity_shift']} tokens (shift), {r['capacity_concat']} tokens "
            "(concat: new tokens only in the bottom row)",
            f"  fits: {'yes' if r['fits'] else 'NO: ' + r['reason']}",
        ]
        if r["stages"] and r["stages"] > 1:
            lines.append(
                f"  as a layer pipeline: {r['stages']} stages of {py}x{px} "
                f"({r['stage_cores']} cores, {'fits' if r['stages_fit_device'] else 'more than'} "
                f"the device), {_kib(r['stage_weights_bytes'])} of weights and "
                f"{r['stage_kv_slots']} KV slots per core per stage; each stage busy 1/"
                f"{r['stages']} of the time"
            )
        elif r["stages"] is None:
            lines.append("  as a layer pipeline: no, one layer alone exceeds the core memory")
    w = p.get("wafer", {})
    if "error" in w:
        lines.append(f"wafer placement: cannot place: {w['error']}")
    elif w:
        for ph in ("prefill", "decode"):
            r = w[ph]
            lines.append(
                f"wafer placement, {ph}: {r['stages']} stage(s) of {r['mesh'][0]}x"
                f"{r['mesh'][1]} ({r['layers_per_stage']} layers), "
                f"{r['wafers']} wafer(s), {r['method']}"
            )
        together = "coexist" if w["coexist"] else "do not coexist: weights re-placed at the switch"
        lines.append(
            f"  prefill and decode {together}; "
            f"KV capacity with all free memory: {w['kv_capacity']['shift']} tokens "
            f"(shift), {w['kv_capacity']['concat']} (concat)"
        )
    s = p["smallest_square"]
    ctx = f" with KV for {p['context']} tokens" if p["context"] else ""
    lines.append(
        "smallest square meshes that hold the weights"
        + ctx
        + ": "
        + ", ".join(f"{ph} {v}x{v}" if v else f"{ph}: none on this device" for ph, v in s.items())
    )
    return "\n".join(lines)
