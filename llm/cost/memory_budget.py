"""What ``python -m llm plan`` prints: the placement of a model on a device, in words.

Every figure comes from :mod:`llm.cost.wafer` (stages, regions, wafers, memory per core, KV
capacity); this module chooses the meshes when none are given and formats the result. No MPI,
no weights.
"""

from __future__ import annotations

from meshrt.plmr import Device, get_device

from ..modeling.config import ModelConfig
from ..placement.layout import mesh_pair
from .wafer import (
    Demand,
    PlacementError,
    check_mesh,
    fewest_stages,
    kv_capacity,
    place,
    place_phase,
)

#: Context of the request ``plan`` places when none is given (half prompt, half output).
DEFAULT_CONTEXT = 4096


def smallest_square_mesh(
    config: ModelConfig, device: Device, phase: str, context: int
) -> int | None:
    """Smallest side ``s`` whose ``s x s`` mesh holds the whole phase in one stage, or ``None``
    if no square mesh on the device does."""
    tokens = max(1, context // 2) if phase == "prefill" else context
    demand = Demand(config, device, phase, tokens, tokens)

    def one_stage(side: int) -> bool:
        try:
            return fewest_stages(demand, (side, side)) == 1
        except PlacementError:
            return False

    lo, hi = 1, min(device.cores_x, device.cores_y)
    if not one_stage(hi):
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if one_stage(mid) else (mid + 1, hi)
    return lo


def memory_budget(
    config: ModelConfig,
    decode_mesh=None,
    prefill_mesh=None,
    device="wse2",
    context: int | None = None,
) -> dict:
    """The placement of a ``context``-token request (half prompt, half output; default
    :data:`DEFAULT_CONTEXT`) of ``config`` on ``device``: per phase its stages and what each
    core of them holds, the decode KV capacity per policy, whether the phases coexist.

    Meshes not given: decode the smallest square that holds it in one stage, prefill the
    decode mesh.
    """
    dev = get_device(device)
    ctx = context or DEFAULT_CONTEXT
    prompt, new = max(1, ctx // 2), max(1, ctx - ctx // 2)
    out: dict = {
        "model": config.name or config.family,
        "family": config.family,
        "layers": config.num_layers,
        "parameters": config.num_parameters(),
        "device": dev.name,
        "device_cores": [dev.cores_y, dev.cores_x],
        "mem_per_core": dev.mem_per_core,
        "reserved_bytes": dev.reserved_bytes,
        "word_bytes": dev.word_bytes,
        "context": ctx,
    }
    smallest = {ph: smallest_square_mesh(config, dev, ph, ctx) for ph in ("decode", "prefill")}
    out["smallest_square"] = smallest
    largest = min(dev.cores_x, dev.cores_y)
    if decode_mesh is not None:
        dmesh, dwhy = mesh_pair(decode_mesh), "given"
    else:
        side = smallest["decode"] or largest
        dmesh, dwhy = (side, side), "smallest square holding it in one stage"
    if prefill_mesh is not None:
        pmesh, pwhy = mesh_pair(prefill_mesh), "given"
    else:
        pmesh, pwhy = dmesh, "same as decode"
    check_mesh(dev, dmesh, "decode")
    check_mesh(dev, pmesh, "prefill")
    phases: dict[str, dict] = {}
    out["phases"] = phases
    for ph, mesh, why, tokens in (
        ("decode", dmesh, dwhy, ctx),
        ("prefill", pmesh, pwhy, prompt),
    ):
        rec: dict = {
            "phase": ph,
            "mesh": list(mesh),
            "mesh_cores": mesh[0] * mesh[1],
            "mesh_choice": why,
        }
        try:
            pl = place_phase(config, dev, mesh, ph, tokens, tokens)
        except PlacementError as e:
            rec.update(fits=False, reason=str(e))
        else:
            rec.update(pl.summary())
            rec["weights_bytes"] = max(pl.summary()["weight_bytes_per_core"])
            rec["fits"] = pl.wafers == 1
            rec["reason"] = "" if pl.wafers == 1 else f"needs {pl.wafers} wafers"
            rec["stage_lines"] = [s.describe() for s in pl.stages]
        phases[ph] = rec
    try:
        cap = kv_capacity(config, dev, dmesh)
        out["kv_capacity"] = {k: cap[k] for k in ("shift", "concat", "wafers", "stages", "cores")}
        run = place(config, dev, pmesh, dmesh, prompt, new)
        out["coexist"] = run.coexist
        out["wafers"] = run.wafers
    except PlacementError as e:
        out["kv_capacity"] = {"error": str(e)}
        out["coexist"], out["wafers"] = False, None
    out["fits"] = all(r["fits"] for r in phases.values())
    return out


def _kib(n: float) -> str:
    return f"{n / 1024:.2f} KiB" if n < 1024 * 1024 else f"{n / 2**20:.2f} MiB"


def format_memory_budget(p: dict) -> str:
    """Human-readable form of :func:`memory_budget`'s result."""
    lines = [
        f"model:  {p['model']} ({p['family']}), {p['layers']} layers, "
        f"{p['parameters'] / 1e6:.1f} M parameters",
        f"device: {p['device']}, {p['device_cores'][0]}x{p['device_cores'][1]} usable cores, "
        f"{p['mem_per_core'] / 1024:.0f} KiB per core ({_kib(p['reserved_bytes'])} reserved), "
        f"{p['word_bytes']}-byte words",
        f"request: {p['context']} tokens (half prompt, half output)",
    ]
    for ph, r in p["phases"].items():
        py, px = r["mesh"]
        lines.append(f"{ph} mesh {py}x{px} ({r['mesh_cores']} cores; {r['mesh_choice']}):")
        if "stages" not in r:
            lines.append(f"  fits: NO: {r['reason']}")
            continue
        lines.append(
            f"  {r['stages']} stage(s) on {r['cores']} cores, {r['wafers']} wafer(s), {r['method']}"
        )
        for i, line in enumerate(r["stage_lines"]):
            lines.append(
                f"    {line}; per core: weights {_kib(r['weight_bytes_per_core'][i])}, "
                f"KV {_kib(r['kv_bytes_per_core'][i])}, buffers "
                f"{_kib(r['buffer_bytes_per_core'][i])}, free {_kib(r['free_bytes_per_core'][i])}"
            )
        lines.append(f"  fits one wafer: {'yes' if r['fits'] else 'NO: ' + r['reason']}")
    cap = p["kv_capacity"]
    if "error" in cap:
        lines.append(f"KV capacity: none: {cap['error']}")
    else:
        lines.append(
            f"KV capacity (decode): {cap['shift']} tokens with the shift policy, "
            f"{cap['concat']} with concat; counted in the memory of every usable core of "
            f"{cap['wafers']} wafer(s) less the reserve and less the weights and buffers of the "
            f"{cap['stages']} decode stage(s) ({cap['cores']} cores) placed alone; concat puts "
            "every new token in one row of the mesh"
        )
    if p.get("wafers"):
        together = (
            "coexist on the wafer"
            if p["coexist"]
            else "do not coexist: the weights are re-placed at the switch"
        )
        lines.append(f"prefill and decode {together}; {p['wafers']} wafer(s) in all")
    s = p["smallest_square"]
    lines.append(
        "smallest square meshes that hold the whole phase in one stage: "
        + ", ".join(f"{ph} {v}x{v}" if v else f"{ph}: none on this device" for ph, v in s.items())
    )
    return "\n".join(lines)
