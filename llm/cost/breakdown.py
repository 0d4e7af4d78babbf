"""Where one layer's modeled time goes, kernel by kernel (``llm estimate --breakdown``).

The same ledgers the estimates come from (:func:`llm.cost.estimate.decode_token`,
:func:`llm.cost.estimate.prefill`), priced for a one-layer copy of the model: every record of
``layer0/`` is grouped by its kernel (``qkv``, ``scores``, ``gate_up``, ...) and split three ways:

* ``compute`` and ``communication``: a record goes to the larger of its compute and fabric
  cycles. Local GEMVs, softmax and RoPE move nothing; allreduce levels and broadcasts add as
  the words stream by (communication-bound); a MeshGEMM step multiplies while its tiles shift
  (compute-bound when the tiles are large enough);
* ``fixed``: the kernel's task switch (``Device.task_switch``, once per kernel per layer).

The three add up to the kernel's cycles, and the kernels to the layer's. What runs once, outside
the layers, comes from the whole model's ledger: for decode the embedding, final norm, LM head
and pick; for prefill the embedding and the hand-off of every layer's K/V to the decode mesh.
So the whole model on one mesh is ``outside + num_layers * layer``.

The kernel tables price the emulator's mesh (an unfolded square). ``stages`` then follows the
decode step through the placement :mod:`llm.cost.wafer` makes of it (what ``llm estimate`` and
the decode tables price): every stage's mesh, fold and layers, its per-layer cycles, and the
hand-overs between stages; they add up to the modeled time per token at that context.
"""

from __future__ import annotations

import dataclasses
import re

from meshrt.collectives import KTREE, AllreduceSpec
from meshrt.plmr import Device, Ledger, get_device

from ..modeling.config import ModelConfig
from . import estimate, predict
from .wafer import place_decode, stage_transfers

LAYER = "layer0/"
_IN_LAYER = re.compile(r"layer\d+/")


def _kind(part: str, t) -> str:
    if part == "task_switch":
        return "fixed"
    return "compute" if t.compute_cycles >= t.comm_cycles else "communication"


def _kernel_names(led: Ledger) -> set:
    """The kernels the ledger's cores ran: each paid its task switch, ``<kernel>/task_switch``."""
    end = "/task_switch"
    return {name[: -len(end)] for name in led.ops if name.endswith(end)}


def _kernel_of(name: str, kernels: set) -> str:
    """The kernel of record ``name``: the longest of ``kernels`` that holds it (itself if
    none)."""
    part = name
    while part not in kernels and "/" in part:
        part = part.rsplit("/", 1)[0]
    return part if part in kernels else name


def _kernels(led: Ledger, inside: bool) -> list[dict]:
    """The ledger's records by kernel: those of the layers (``inside``) or all the others."""
    rows: dict[str, dict] = {}
    names = _kernel_names(led)
    for name, t in led.ops.items():
        if bool(_IN_LAYER.match(name)) != inside:
            continue
        kernel = _kernel_of(name, names)
        part = name[len(kernel) + 1 :] or "step"
        row = rows.setdefault(
            kernel,
            {
                "kernel": kernel.removeprefix(LAYER),
                "cycles": 0.0,
                "compute": 0.0,
                "communication": 0.0,
                "fixed": 0.0,
                "parts": {},
            },
        )
        row["cycles"] += t.cycles
        row[_kind(part, t)] += t.cycles
        row["parts"][part] = t.cycles
    return list(rows.values())


def _section(layer: Ledger, whole: Ledger, device: Device, **about) -> dict:
    """``layer``: a one-layer model's ledger; ``whole``: the whole model's (what runs once)."""
    kernels = _kernels(layer, inside=True)
    total = sum(r["cycles"] for r in kernels)
    for r in kernels:
        r["share"] = r["cycles"] / total if total else 0.0
    split = {k: sum(r[k] for r in kernels) for k in ("compute", "communication", "fixed")}
    return {
        **about,
        "layer_cycles": total,
        "layer_seconds": device.seconds(total),
        "layer_split": split,
        "kernels": kernels,
        "outside_layers": _kernels(whole, inside=False),
    }


def layer_breakdown(
    config: ModelConfig,
    prefill_mesh: tuple[int, int],
    decode_mesh: tuple[int, int],
    tokens: int,
    device: Device | str = "wse2",
    policy: str = "shift",
    allreduce: AllreduceSpec = KTREE,
) -> dict:
    """One decode step at context ``tokens`` and one prefill of ``tokens``, one layer each.

    Returns
    -------
    dict
        ``decode`` and ``prefill``: ``layer_cycles``, ``layer_seconds``, ``layer_split``
        (compute / communication / fixed cycles), ``kernels`` (per kernel: ``cycles``,
        ``share`` of the layer, the three-way split and ``parts``, the cycles of every
        record) and ``outside_layers`` (the same rows for what the whole model runs once).
    """
    device = get_device(device)

    def decode(cfg):
        return estimate.decode_token(
            cfg, decode_mesh, device, context=tokens, policy=policy, allreduce=allreduce
        )

    def prefill(cfg):
        return estimate.prefill(cfg, prefill_mesh, tokens, device, decode_mesh, allreduce=allreduce)

    one = dataclasses.replace(config, num_layers=1)
    pl = place_decode(config, device, decode_mesh, tokens, policy)
    stages = predict.decode_stages(config, pl, device, tokens, policy, 0, allreduce)
    handovers = predict.transfer_cycles(device, stage_transfers(pl, config, 1))
    return {
        "model": config.name,
        "device": device.name,
        "decode": _section(
            decode(one),
            decode(config),
            device,
            mesh=list(decode_mesh),
            context=tokens,
            policy=policy,
            stages=stages,
            handover_cycles=handovers,
            step_cycles=sum(r["cycles"] for r in stages) + handovers,
            step_seconds=device.seconds(sum(r["cycles"] for r in stages) + handovers),
        ),
        "prefill": _section(
            prefill(one), prefill(config), device, mesh=list(prefill_mesh), tokens=tokens
        ),
    }


def format_breakdown(b: dict) -> str:
    """:func:`layer_breakdown` as text tables (cycles; shares of the layer)."""
    lines = []
    for phase, what in (
        ("decode", f"one decode step at context {b['decode']['context']}"),
        ("prefill", f"prefill of {b['prefill']['tokens']} tokens"),
    ):
        s = b[phase]
        mesh = "x".join(map(str, s["mesh"]))
        split = s["layer_split"]
        total = s["layer_cycles"] or 1.0
        lines += [
            f"{b['model']} on {b['device']}, {phase} {mesh}: {what}, one layer "
            f"{s['layer_cycles']:,.0f} cycles ({s['layer_seconds'] * 1e6:.2f} us): compute "
            f"{split['compute'] / total:.0%}, communication {split['communication'] / total:.0%}"
            f", fixed {split['fixed'] / total:.0%}",
            f"  {'kernel':<16s} {'cycles':>12s} {'share':>6s} {'compute':>12s} "
            f"{'comm':>12s} {'fixed':>8s}",
        ]
        for r in sorted(s["kernels"], key=lambda r: -r["cycles"]):
            lines.append(
                f"  {r['kernel']:<16s} {r['cycles']:12,.0f} {r['share']:6.1%} "
                f"{r['compute']:12,.0f} {r['communication']:12,.0f} {r['fixed']:8,.0f}"
            )
        outside = ", ".join(f"{r['kernel']} {r['cycles']:,.0f}" for r in s["outside_layers"])
        lines.append(f"  outside the layers (once): {outside}")
        if "stages" in s:
            lines.append(
                f"  on the wafer: {len(s['stages'])} stage(s), one step {s['step_cycles']:,.0f} "
                f"cycles ({s['step_seconds'] * 1e6:.2f} us, {1 / s['step_seconds']:.1f} tok/s) "
                f"with {s['handover_cycles']:,.0f} cycles of hand-overs:"
            )
            for r in s["stages"]:
                lines.append(
                    f"    {r['stage']}: {r['layer_cycles']:,.0f} cycles per layer, "
                    f"{r['cycles']:,.0f} in all"
                )
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
