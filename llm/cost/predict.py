"""Closed-form predictions of a whole run on the wafer: TTFT, TPOT, end-to-end and KV capacity.

Combines the layer schedules priced by :mod:`llm.cost.estimate` (the same records the emulator
writes) with the wafer placement of :mod:`llm.cost.wafer` (pipeline stages, the transfers between
them, whether prefill and decode coexist). No emulation and no weights.

All layers of a model are the same, so every schedule is priced for a 1-layer and a 2-layer
copy of the model: ``cost(L) = ends + L * layer`` exactly, because every record of the
schedule is either per layer or once per run (``layer = cost(2) - cost(1)``,
``ends = 2 cost(1) - cost(2)``). Each stage is priced at its own mesh and region links (a
remainder stage has a smaller mesh, a folded one longer links): its layers at its per-layer
cost, the embedding on the first stage, the LM head and pick on the last (decode); in prefill
what runs once (embedding, hand-off, first token) is priced at the first stage's mesh. A decode
step depends on its context only through the fullest cache row (and whether the cache shifts),
so steps with the same row fill are priced once.

Timeline of a request with a ``N``-token prompt and ``M`` new tokens (batch 1)::

    TTFT    = prefill of N tokens (all stages, their transfers, the hand-off to decode)
              + the first token's final norm, LM head and pick on the decode mesh
    t_j     = decode step j (j = 2..M) with N + j - 1 cached tokens, all stages + transfers
    TPOT    = mean t_j (the single step at context N when M = 1)
    e2e TPR = M / (TTFT + sum t_j)

When both phases' regions fit the wafer together, the weights stay where they are and the
hand-off's weight re-placement is not paid; otherwise it is.
"""

from __future__ import annotations

import dataclasses
import functools

from meshrt.collectives import KTREE, AllreduceSpec
from meshrt.plmr import Device, Ledger, get_device

from ..engine import program as P
from ..engine.kinds import Site, charge
from ..engine.kvcache import kv_step
from ..modeling.config import ModelConfig
from ..placement.layout import PhaseLayout, mesh_pair
from . import estimate
from .wafer import (
    PhasePlacement,
    PlacementError,
    RunPlacement,
    kv_capacity,
    place,
    place_decode,
    stage_transfers,
    stream_cycles,
)

__all__ = ["predict", "modeled_wafer", "format_modeled_wafer", "PlacementError"]


def _with_layers(config: ModelConfig, n: int) -> ModelConfig:
    return dataclasses.replace(config, num_layers=n)


def _affine(fn, config: ModelConfig) -> tuple[float, float]:
    """``(ends, per_layer)`` cycles of ``fn(config_with_n_layers)`` for ``n`` = 1 and 2."""
    one, two = fn(_with_layers(config, 1)), fn(_with_layers(config, 2))
    return 2 * one - two, two - one


def _ops_cycles(led: Ledger, suffix: str) -> float:
    return sum(t.cycles for name, t in led.ops.items() if name.endswith(suffix))


_DECODE_PARTS: dict = {}


def _decode_parts(
    config: ModelConfig,
    mesh: tuple[int, int],
    links: tuple[int, int],
    device: Device,
    context: int,
    policy: str,
    prompt: int,
    allreduce: AllreduceSpec,
    batch: int = 1,
) -> tuple[float, float, float]:
    """``(head, per_layer, tail)`` cycles of a decode step of ``batch`` sequences, each with
    ``context`` cached tokens, on one stage's mesh and links.

    Steps with the same fullest-row fill (and shift or not) cost the same: priced once.
    """
    py = mesh[0]
    fill = estimate.row_fill(policy, context, py, prompt)
    shifts = kv_step(policy, context - 1, py).size > 0
    key = (config, tuple(mesh), tuple(links), device, policy, fill, shifts, allreduce, batch)
    if key not in _DECODE_PARTS:
        if len(_DECODE_PARTS) > 4096:
            _DECODE_PARTS.clear()

        def cycles(cfg):
            if batch == 1:
                led = estimate.decode_token(
                    cfg,
                    tuple(mesh),
                    device,
                    context=context,
                    policy=policy,
                    prompt=prompt,
                    allreduce=allreduce,
                    links=links,
                )
            else:
                led = estimate.decode_batch_step(
                    cfg,
                    tuple(mesh),
                    [context] * batch,
                    device,
                    policy,
                    prompts=[prompt] * batch,
                    allreduce=allreduce,
                    links=links,
                )
            return led.cycles

        ends, layer = _affine(cycles, config)
        lay = PhaseLayout(config, *mesh)
        head = Ledger(device)
        run = P.Pass(token_col=0) if batch == 1 else P.Pass(token_cols=(0,) * batch)
        charge(P.decode_head(lay), head, Site(lay, allreduce, run), links)
        _DECODE_PARTS[key] = (head.cycles, layer, ends - head.cycles)
    return _DECODE_PARTS[key]


def decode_stages(
    config: ModelConfig,
    placement: PhasePlacement,
    device: Device,
    context: int,
    policy: str = "shift",
    prompt: int = 0,
    allreduce: AllreduceSpec = KTREE,
    batch: int = 1,
) -> list[dict]:
    """Cycles of one decode step of ``batch`` sequences (each with ``context`` cached tokens),
    stage by stage: each stage's
    layers at its own mesh and links (``layer_cycles`` each, ``cycles`` in all), the first
    stage with the embedding (``head_cycles``), the last with the LM head and pick
    (``tail_cycles``). Hand-overs between stages excluded."""
    stages = placement.stages
    rows = []
    for i, s in enumerate(stages):
        head, layer, tail = _decode_parts(
            config, s.mesh, s.links, device, context, policy, prompt, allreduce, batch
        )
        head = head if i == 0 else 0.0
        tail = tail if i == len(stages) - 1 else 0.0
        rows.append(
            {
                "stage": s.describe(),
                "mesh": list(s.mesh),
                "links": list(s.links),
                "layers": s.layers,
                "layer_cycles": layer,
                "head_cycles": head,
                "tail_cycles": tail,
                "cycles": s.layers * layer + head + tail,
            }
        )
    return rows


@functools.lru_cache(maxsize=256)
def _ttft_parts(
    config: ModelConfig,
    prefill_mesh: tuple,
    decode_mesh: tuple,
    tokens: int,
    device: Device,
    allreduce: AllreduceSpec = KTREE,
    links: tuple = (1, 1),
) -> tuple:
    def parts(cfg):
        r = estimate.ttft(
            cfg, prefill_mesh, tokens, decode_mesh, device, allreduce=allreduce, links=links
        )
        return (r["cycles"], _ops_cycles(r["prefill_ledger"], "handoff/weights"))

    one, two = parts(_with_layers(config, 1)), parts(_with_layers(config, 2))
    return tuple(2 * a - b for a, b in zip(one, two)), tuple(b - a for a, b in zip(one, two))


def ttft_cycles(
    config: ModelConfig,
    placement: PhasePlacement,
    decode_mesh: tuple[int, int],
    tokens: int,
    device: Device,
    allreduce: AllreduceSpec = KTREE,
) -> tuple[float, float]:
    """``(cycles, weight re-placement cycles)`` of a prefill of ``tokens`` through every stage
    of ``placement`` with the hand-off and the first token, stage hand-overs excluded.

    Each stage's layers are priced at its own mesh and links, a streamed layer at the longer of
    its compute and its weights' stream (:func:`llm.cost.wafer.stream_cycles`); what runs once
    (the embedding, the hand-off to decode, the first token) at the first stage's.
    """
    total = replace = 0.0
    for i, s in enumerate(placement.stages):
        (t_ends, w_ends), (t_layer, w_layer) = _ttft_parts(
            config, tuple(s.mesh), tuple(decode_mesh), tokens, device, allreduce, tuple(s.links)
        )
        # a streamed layer takes the longer of its compute and the stream of its weights
        streamed = s.streamed * max(t_layer, stream_cycles(config, device, s)) if s.streamed else 0
        total += s.layers * t_layer + streamed + (t_ends if i == 0 else 0)
        replace += (s.layers + s.streamed) * w_layer + (w_ends if i == 0 else 0)
    return total, replace


def transfer_cycles(device: Device, transfers: list[dict]) -> float:
    """Cycles of the stage hand-overs: each a kernel of its own on pre-routed paths."""
    led = Ledger(device)
    return sum(
        led.step_cycles(words=t["words"], hops=t["hops"], routings=t["routings"])[0]
        + device.task_switch
        for t in transfers
    )


def predict(
    config: ModelConfig,
    prefill_mesh: tuple[int, int],
    decode_mesh: tuple[int, int],
    prompt: int,
    new_tokens: int,
    device: Device | str = "wse2",
    policy: str = "shift",
    allreduce: AllreduceSpec = KTREE,
) -> dict:
    """Modeled figures of one request (see the module docstring for the timeline).

    Returns
    -------
    dict
        ``ttft_s``, ``prefill_tpr`` (``prompt / ttft_s``), ``tpot_s``, ``decode_tpr``,
        ``e2e_tpr``, ``kv_capacity`` {shift, concat} (:func:`llm.cost.wafer.kv_capacity`),
        ``stages`` {prefill, decode}, ``cores`` {prefill, decode, wafer}, ``fits``,
        ``violations``, ``wafers``, ``method``, ``placement`` (details), ``parts_s`` (TTFT and
        decode breakdown) and ``inter_wafer_handovers`` {prefill, decode_per_token}: stage
        hand-overs that cross wafers, priced as on-wafer hand-overs (the wafer-to-wafer link is
        excluded, see :data:`llm.cost.wafer.INTER_WAFER_NOTE`).

    Raises
    ------
    PlacementError
        The configuration cannot be placed (see :func:`llm.cost.wafer.place`).
    """
    device = get_device(device)
    if prompt < 1 or new_tokens < 1:
        raise ValueError("prompt and new_tokens must be at least 1")
    pmesh, dmesh = mesh_pair(prefill_mesh), mesh_pair(decode_mesh)
    placement: RunPlacement = place(config, device, pmesh, dmesh, prompt, new_tokens, policy)

    ttft_c, replace_cycles = ttft_cycles(
        config, placement.prefill, dmesh, prompt, device, allreduce
    )
    if placement.coexist:
        ttft_c -= replace_cycles
    pre_transfers = stage_transfers(placement.prefill, config, prompt)
    pre_xfer = transfer_cycles(device, pre_transfers)
    ttft_c += pre_xfer

    dec = placement.decode
    dec_transfers = stage_transfers(dec, config, 1)
    dec_xfer = transfer_cycles(device, dec_transfers)
    contexts = [prompt] if new_tokens == 1 else range(prompt + 1, prompt + new_tokens)
    steps = [
        sum(r["cycles"] for r in decode_stages(config, dec, device, c, policy, prompt, allreduce))
        + dec_xfer
        for c in contexts
    ]
    tpot_cycles = sum(steps) / len(steps)
    decode_total = sum(steps) if new_tokens > 1 else 0.0

    ttft_s = device.seconds(ttft_c)
    tpot_s = device.seconds(tpot_cycles)
    e2e_s = ttft_s + device.seconds(decode_total)
    kv = kv_capacity(config, device, dmesh)
    violations = []
    context = prompt + new_tokens
    if kv[policy] < context:
        violations.append(
            f"the KV cache holds {kv[policy]} tokens ({policy}), fewer than the "
            f"{context} of this request"
        )
    if placement.wafers > 1:
        violations.append(
            f"the model needs {placement.wafers} wafers; priced as a layer subset on "
            "one wafer, scaled per layer (inter-wafer links excluded)"
        )
    wafer_cores = device.cores_x * device.cores_y
    return {
        "model": config.name or config.family,
        "device": device.name,
        "prefill_mesh": list(pmesh),
        "decode_mesh": list(dmesh),
        "prompt_len": prompt,
        "new_tokens": new_tokens,
        "policy": policy,
        "ttft_s": ttft_s,
        "prefill_tpr": prompt / ttft_s,
        "tpot_s": tpot_s,
        "decode_tpr": 1.0 / tpot_s,
        "e2e_tpr": new_tokens / e2e_s,
        "kv_capacity": {"shift": kv["shift"], "concat": kv["concat"]},
        "stages": {
            "prefill": len(placement.prefill.stages),
            "decode": len(dec.stages),
        },
        "cores": {
            "prefill": placement.prefill.stage_cores,
            "decode": dec.stage_cores,
            "wafer": wafer_cores,
        },
        "fits": not violations,
        "violations": violations,
        "wafers": placement.wafers,
        "method": placement.method,
        "parts_s": {
            "prefill_and_first_token": device.seconds(ttft_c - pre_xfer),
            "prefill_stage_transfers": device.seconds(pre_xfer),
            "weight_replacement": 0.0 if placement.coexist else device.seconds(replace_cycles),
            "decode_stage_transfers_per_token": device.seconds(dec_xfer),
            "decode_total": device.seconds(decode_total),
        },
        "inter_wafer_handovers": {
            "prefill": sum(t["inter_wafer"] for t in pre_transfers),
            "decode_per_token": sum(t["inter_wafer"] for t in dec_transfers),
        },
        "placement": placement.summary(),
    }


def decode_tpr(
    config: ModelConfig, mesh: tuple[int, int], device: Device | str = "wse2", context: int = 4096
) -> float:
    """Decode TPR of one step with ``context`` cached tokens on a decode-only placement
    (stages and their transfers included): the figure of the paper's decode tables."""
    device = get_device(device)
    pl = place_decode(config, device, mesh_pair(mesh), context)
    stages = decode_stages(config, pl, device, context)
    cycles = sum(r["cycles"] for r in stages) + transfer_cycles(
        device, stage_transfers(pl, config, 1)
    )
    return 1.0 / device.seconds(cycles)


#: The figures :func:`modeled_wafer` reports (a subset of :func:`predict`'s).
MODELED_KEYS = (
    "ttft_s",
    "prefill_tpr",
    "tpot_s",
    "decode_tpr",
    "e2e_tpr",
    "kv_capacity",
    "stages",
    "cores",
    "wafers",
    "method",
    "fits",
    "violations",
)


def modeled_wafer(
    config: ModelConfig,
    prefill_mesh: tuple[int, int],
    decode_mesh: tuple[int, int],
    prompt: int,
    new_tokens: int,
    device: Device | str = "wse2",
    policy: str = "shift",
    allreduce: AllreduceSpec = KTREE,
) -> dict:
    """The wafer's figures of one request, as ``llm estimate`` gives them, for other reports.

    ``generate`` and ``bench`` call this with their run's config, meshes and token counts so
    that every command reports the wafer through :func:`predict`. ``new_tokens`` below 1
    counts as 1 (a request that stopped before its first decode step).

    Returns
    -------
    dict
        The :data:`MODELED_KEYS` of :func:`predict`, or ``{"error": reason}`` when the
        configuration cannot be placed on ``device`` (e.g. one layer does not fit a core of a
        small mesh).
    """
    try:
        r = predict(
            config,
            prefill_mesh,
            decode_mesh,
            max(1, int(prompt)),
            max(1, int(new_tokens)),
            device,
            policy,
            allreduce,
        )
    except PlacementError as e:
        return {"error": str(e)}
    return {k: r[k] for k in MODELED_KEYS}


def format_modeled_wafer(m: dict, device: str) -> str:
    """One line of :func:`modeled_wafer`'s figures (or why there are none)."""
    if "error" in m:
        return f"modeled wafer ({device}, whole model): not placeable: {m['error']}"
    return (
        f"modeled wafer ({device}, whole model, as llm estimate): TTFT "
        f"{m['ttft_s'] * 1e3:.3f} ms, TPOT {m['tpot_s'] * 1e3:.4f} ms, decode TPR "
        f"{m['decode_tpr']:.1f} tok/s, e2e TPR {m['e2e_tpr']:.1f} tok/s, stages "
        f"{m['stages']['prefill']}+{m['stages']['decode']}, {m['wafers']} wafer(s)"
    )
