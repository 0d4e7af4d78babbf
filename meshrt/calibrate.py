"""Fitting device constants on measured points, and the paper's two MeshGEMV points.

The paper (Table 6) gives two MeshGEMV times on WSE-2:

* ``[1,16K] x [16K,16K]``: 0.0012 ms
* ``[1,32K] x [32K,32K]``: 0.00203 ms

Their mesh is not stated; the largest the paper uses, 720 x 720, with the public code's K-tree
setting for that size (two levels, 24 groups), is assumed. Both points are one kernel repeated
back to back, so they never pay a kernel switch; the difference between them is the local GEMV
growing from 23 x 23 to 46 x 46 elements per core, which fixes ``vector_setup``; their level
fixes the latency of the routing stages (``beta``).

:func:`fit` solves for any set of constants, one per point, by Newton steps on finite
differences (the cost model is piecewise linear in its constants). The full WSE-2 calibration,
which also uses a decode throughput and a KV capacity, lives in :mod:`llm.cost.calibration`
(``meshrt`` knows nothing of models).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np

from .plmr import Device

GEMV_POINTS = (  # (M = N, seconds) from Table 6
    (16384, 0.0012e-3),
    (32768, 0.00203e-3),
)
POINTS = GEMV_POINTS
MESH = (720, 720)
GROUPS = 24


def modeled_seconds(device: Device, size: int) -> float:
    """Modeled time of the ``[1, size] x [size, size]`` MeshGEMV of Table 6."""
    from .collectives import AllreduceSpec
    from .ops.gemv import estimate_meshgemv
    from .plmr import Ledger

    # the benchmark repeats the kernel back to back: it is already running (no task switch)
    led = Ledger(device, kernel="meshgemv")
    return estimate_meshgemv(
        size, size, MESH, device, spec=AllreduceSpec(groups=GROUPS), ledger=led
    ).seconds


def gemv_points() -> list[tuple[str, float, Callable[[Device], float]]]:
    """``(label, measured seconds, model(device) -> seconds)`` of the Table-6 points."""
    return [
        (
            f"MeshGEMV [1,{n // 1024}K]x[{n // 1024}K,{n // 1024}K] on 720x720",
            t,
            partial(modeled_seconds, size=n),
        )
        for n, t in GEMV_POINTS
    ]


def fit(
    base: Device,
    names: list[str],
    points: list,
    start: list[float] | None = None,
    iters: int = 60,
    tol: float = 1e-10,
) -> Device:
    """``base`` with the constants ``names`` set so that every point is reproduced.

    Parameters
    ----------
    names : list of str
        Device fields to solve for, as many as ``points``.
    points : list of (label, target, model)
        ``model(device)`` returns the modeled value of a point whose measured value is
        ``target``.

    Raises
    ------
    ValueError
        No non-negative solution: the points contradict the model's structure.
    """
    if len(names) != len(points):
        raise ValueError("fit needs one point per constant")
    theta = np.array(start if start is not None else [1.0] * len(names), dtype=float)
    target = np.array([p[1] for p in points])

    def values(th):
        dev = base.with_(**dict(zip(names, map(float, th))))
        return np.array([p[2](dev) for p in points]) / target

    for _ in range(iters):
        f = values(theta)
        if np.max(np.abs(f - 1.0)) < tol:
            break
        jac = np.empty((len(names), len(names)))
        for j in range(len(names)):
            step = max(1e-3, 1e-4 * abs(theta[j]))
            th = theta.copy()
            th[j] += step
            jac[:, j] = (values(th) - f) / step
        theta = theta + np.linalg.solve(jac, 1.0 - f)
    if np.any(theta < 0) or np.max(np.abs(values(theta) - 1.0)) > 1e-6:
        raise ValueError(
            f"no non-negative fit of {names} on {[p[0] for p in points]}: {dict(zip(names, theta))}"
        )
    return base.with_(**dict(zip(names, map(float, theta))))


def residuals(device: Device, points: list) -> list[tuple[str, float, float, float]]:
    """``(label, measured, modeled, modeled / measured - 1)`` of every point."""
    out = []
    for label, target, model in points:
        v = model(device)
        out.append((label, target, v, v / target - 1.0))
    return out


def format_residuals(rows) -> str:
    return "\n".join(
        f"  {label}: paper {t:.6g}, model {v:.6g} ({r:+.2e})" for label, t, v, r in rows
    )


def report(device: Device) -> str:
    """The device constants and its residuals on the GEMV points."""
    lines = [
        f"{device.name}: alpha={device.alpha:g} cycles/hop, beta={device.beta:.4g} "
        f"cycles/routing, vector_setup={device.vector_setup:.4g} cycles, "
        f"task_switch={device.task_switch:.4g} cycles, step_overhead="
        f"{device.step_overhead:g}, macs_per_cycle={device.macs_per_cycle:g}",
        f"  assumed GEMV mesh {MESH[0]}x{MESH[1]}, K-tree with {GROUPS} groups",
    ]
    lines.append(format_residuals(residuals(device, gemv_points())))
    return "\n".join(lines)
