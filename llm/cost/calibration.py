"""The WSE-2 preset's constants, derived from the paper's allowed points only.

Points (``paper-notes.md`` §5.2; nothing else of the paper's evaluation is used):

====================================================  ==========================  ============
point                                                 measured                    constant
====================================================  ==========================  ============
MeshGEMV [1,16K] x [16K,16K] (Table 6)                0.0012 ms                   ``beta``
MeshGEMV [1,32K] x [32K,32K] (Table 6)                0.00203 ms                  ``vector_setup``
LLaMA3-8B decode on 420 x 420, 4K context (Table 4)   2699.9 tokens/s             ``task_switch``
LLaMA3-8B KV capacity, decode on 360 x 360 (Table 5)  137548 shift / 382 concat   ``reserved_bytes``
====================================================  ==========================  ============

One free constant per physical effect. Everything else comes from the hardware's structure:
1.1 GHz, 48 KB per core, ``alpha`` = 1 cycle per hop (a neighbour link moves one 32-bit
wavelet per cycle), one fp16 element per wavelet, 2 fp16 MACs per cycle (two 32-bit operand
fetches per cycle), the 750 x 994 usable cores of the 757 x 996 fabric. ``step_overhead`` (a
fixed cost per step inside a kernel) is not separable from ``beta`` on the GEMV points and is
left at 0.

The three times are solved together (:func:`meshrt.calibrate.fit`); the reserve is then solved
in closed form so that the shift capacity is 137548 (the concat capacity, the same memory in
one row of 360, follows). ``python -m llm estimate --calibration`` prints the derivation and
the residuals; ``tests/llm/cost/test_predict.py`` re-derives the preset.
"""

from __future__ import annotations

from meshrt.calibrate import fit, format_residuals, gemv_points, residuals
from meshrt.plmr import WSE2, Device

from ..modeling.config import preset

DECODE_POINT = ("llama3-8b", (420, 420), 4096, 2699.9)  # model, mesh, context, tokens/s
KV_POINT = ("llama3-8b", (360, 360), 137548, 382)  # model, mesh, shift, concat
TIME_CONSTANTS = ["beta", "vector_setup", "task_switch"]


def structural(base: Device = WSE2) -> Device:
    """``base`` with the constants that come from the hardware's structure."""
    return base.with_(
        alpha=1.0,
        macs_per_cycle=2.0,
        link_bytes_per_cycle=4.0,
        word_bytes=2,
        step_overhead=0.0,
        mem_per_core=48 * 1024,
        clock_hz=1.1e9,
        cores_x=750,
        cores_y=994,
    )


def time_points() -> list:
    """The three time points as ``(label, seconds, model(device) -> seconds)``."""
    from .predict import decode_tpr

    name, mesh, context, tpr = DECODE_POINT
    config = preset(name)
    decode = (
        f"{name} decode TPR on {mesh[0]}x{mesh[1]}, {context} context (as seconds/token)",
        1.0 / tpr,
        lambda dev: 1.0 / decode_tpr(config, mesh, dev, context),
    )
    return gemv_points() + [decode]


def kv_points() -> list:
    from .wafer import kv_capacity

    name, mesh, shift, concat = KV_POINT
    config = preset(name)
    return [
        (
            f"{name} KV capacity on {mesh[0]}x{mesh[1]}, shift",
            float(shift),
            lambda dev: float(kv_capacity(config, dev, mesh)["shift"]),
        ),
        (
            f"{name} KV capacity on {mesh[0]}x{mesh[1]}, concat",
            float(concat),
            lambda dev: float(kv_capacity(config, dev, mesh)["concat"]),
        ),
    ]


def fit_reserve(device: Device) -> float:
    """``reserved_bytes`` that makes the shift capacity of :data:`KV_POINT` exact (+ half a
    token, so the integer capacity lands on it)."""
    from .wafer import kv_capacity

    name, mesh, shift, _ = KV_POINT
    config = preset(name)
    probe = kv_capacity(config, device.with_(reserved_bytes=0.0), mesh)
    cores = probe["wafers"] * device.cores_x * device.cores_y
    excess = probe["free_bytes"] - (shift + 0.5) * probe["bytes_per_token"]
    reserve = excess / cores
    # the buffers per stage do not depend on the reserve, but the stage count can: iterate
    for _ in range(5):
        probe = kv_capacity(config, device.with_(reserved_bytes=reserve), mesh)
        reserve += (probe["exact_shift"] - (shift + 0.5)) * probe["bytes_per_token"] / cores
    return reserve


def calibrate(base: Device = WSE2) -> Device:
    """The calibrated device: structure from ``base``, four constants from the four points."""
    dev = structural(base)
    dev = dev.with_(reserved_bytes=fit_reserve(dev))
    dev = fit(
        dev,
        TIME_CONSTANTS,
        time_points(),
        start=[base.beta or 5.0, base.vector_setup or 2.0, base.task_switch or 100.0],
    )
    # the time constants do not change the memory, but the reserve changes stage counts
    dev = dev.with_(reserved_bytes=fit_reserve(dev))
    return dev


def report(device: Device = WSE2) -> str:
    """Constants and residuals on every allowed point."""
    lines = [
        f"{device.name}: alpha={device.alpha:g} cycles/hop (structure), "
        f"macs_per_cycle={device.macs_per_cycle:g} (structure), "
        f"wavelet_cycles={device.wavelet_cycles:g} per fp16 element (structure)",
        f"  fitted: beta={device.beta:.5g} cycles/routing, vector_setup="
        f"{device.vector_setup:.5g} cycles/vector instruction, task_switch="
        f"{device.task_switch:.5g} cycles, reserved_bytes={device.reserved_bytes:.5g} "
        "per core",
        "  residuals (modeled / measured - 1):",
    ]
    lines.append(format_residuals(residuals(device, time_points() + kv_points())))
    return "\n".join(lines)
