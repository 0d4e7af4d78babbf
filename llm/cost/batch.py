"""Batched decode on the wafer: ``B`` requests per decode step, closed form.

A step of ``B`` sequences runs every op of the decode program with ``B`` vectors
(:func:`llm.cost.estimate.decode_batch_step`, the records the emulator writes for a batch):
hops, routing and task switches are paid once per step, words and MACs grow with ``B``, and
attention reads each sequence's own cache. Stages, wafers and the KV capacity come from the
placement (:mod:`llm.cost.wafer`); the cache is shared, so each request holds ``1/B`` of it.
Each request gets one token per step: per-request TPR is ``1 / step``, the wafer's total is
``B / step``.
"""

from __future__ import annotations

from meshrt.collectives import KTREE, AllreduceSpec
from meshrt.plmr import Device, get_device

from ..modeling.config import ModelConfig
from ..placement.layout import mesh_pair
from .predict import decode_stages, transfer_cycles
from .wafer import kv_capacity, place_decode, stage_transfers


def batch_decode(
    config: ModelConfig,
    mesh,
    batch: int,
    context: int,
    device: Device | str = "wse2",
    policy: str = "shift",
    allreduce: AllreduceSpec = KTREE,
) -> dict:
    """One decode step of ``batch`` requests, each with ``context`` cached tokens.

    Returns
    -------
    dict
        ``batch``, ``context``, ``step_s``, ``tpr_per_request`` (``1 / step_s``),
        ``total_tokens_per_s`` (``batch / step_s``), ``kv_capacity_per_request`` (tokens of
        the placement's shared cache, ``policy``), ``kv_fits`` (each request's context fits
        it), ``stages`` and ``wafers`` of the decode placement.
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    device = get_device(device)
    mesh = mesh_pair(mesh)
    pl = place_decode(config, device, mesh, context, policy)
    stages = pl.stages
    rows = decode_stages(config, pl, device, context, policy, 0, allreduce, batch)
    cycles = sum(r["cycles"] for r in rows)
    cycles += transfer_cycles(device, stage_transfers(pl, config, batch))
    step = device.seconds(cycles)
    per_request = kv_capacity(config, device, mesh)[policy] // batch
    return {
        "batch": batch,
        "context": context,
        "step_s": step,
        "tpr_per_request": 1.0 / step,
        "total_tokens_per_s": batch / step,
        "kv_capacity_per_request": per_request,
        "kv_fits": per_request >= context,
        "stages": len(stages),
        "wafers": pl.wafers,
    }
