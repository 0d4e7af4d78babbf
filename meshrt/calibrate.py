"""Calibrating the WSE-2 preset on the paper's published MeshGEMV points, and nothing else.

The paper (Table 6) gives two MeshGEMV times on WSE-2:

* ``[1,16K] x [16K,16K]``: 0.0012 ms
* ``[1,32K] x [32K,32K]``: 0.00203 ms

Three constants of the device are unknown: ``alpha`` (cycles per hop), ``beta`` (cycles per
software routing stage) and ``macs_per_cycle``. Two points cannot fix three unknowns, so:

1. ``alpha = 1`` cycle per hop: a WSE-2 router moves one 32-bit word to a neighbour per cycle.
2. The mesh is the paper's largest GEMV mesh, 720 x 720 cores, with the public code's K-tree
   setting for that size (two levels, 24 groups), fp16 words.
3. ``beta`` and ``macs_per_cycle`` are solved so that :func:`meshrt.ops.gemv.estimate_meshgemv`
   reproduces both times exactly (nested bisection; both times grow monotonically in ``beta`` and
   in ``1/macs_per_cycle``).

Everything else (GEMM, decode throughput, other meshes) is then predicted, never fitted.
``python -m meshrt bench calibrate`` prints the derivation.
"""
from __future__ import annotations

from .plmr import Device

POINTS = (  # (M = N, seconds) from Table 6
    (16384, 0.0012e-3),
    (32768, 0.00203e-3),
)
MESH = (720, 720)
GROUPS = 24
ALPHA = 1.0


def modeled_seconds(device: Device, size: int) -> float:
    from .collectives import AllreduceSpec
    from .ops.gemv import estimate_meshgemv
    return estimate_meshgemv(size, size, MESH, device, spec=AllreduceSpec(groups=GROUPS)).seconds


def _bisect(f, lo: float, hi: float, iters: int = 100) -> float:
    """Root of an increasing function ``f`` on ``[lo, hi]``."""
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if f(mid) > 0:
            hi = mid
        else:
            lo = mid
    return 0.5 * (lo + hi)


def calibrate(base: Device) -> Device:
    """``base`` with ``alpha``, ``beta`` and ``macs_per_cycle`` set from :data:`POINTS`."""
    (n1, t1), (n2, t2) = POINTS

    def beta_for(cycles_per_mac: float) -> float:
        dev = lambda b: base.with_(alpha=ALPHA, beta=b, macs_per_cycle=1.0 / cycles_per_mac)  # noqa
        return _bisect(lambda b: modeled_seconds(dev(b), n1) - t1, 0.0, 1e4)

    def residual(cycles_per_mac: float) -> float:
        b = beta_for(cycles_per_mac)
        dev = base.with_(alpha=ALPHA, beta=b, macs_per_cycle=1.0 / cycles_per_mac)
        return modeled_seconds(dev, n2) - t2

    cpm = _bisect(residual, 1e-3, 10.0)
    beta = beta_for(cpm)
    return base.with_(alpha=ALPHA, beta=beta, macs_per_cycle=1.0 / cpm)


def report(device: Device) -> str:
    lines = [f"calibration of {device.name}: alpha={device.alpha:.4g} cycles/hop (assumed), "
             f"beta={device.beta:.4g} cycles/routing, macs_per_cycle={device.macs_per_cycle:.4g}",
             f"  assumed mesh {MESH[0]}x{MESH[1]}, K-tree with {GROUPS} groups, "
             f"{device.word_bytes}-byte words"]
    for n, t in POINTS:
        lines.append(f"  GEMV [1,{n}]x[{n},{n}]: paper {t * 1e3:.5f} ms, "
                     f"model {modeled_seconds(device, n) * 1e3:.5f} ms")
    return "\n".join(lines)
