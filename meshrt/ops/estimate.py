"""Closed-form wafer cost of the GEMM kernels, without running them.

The kernels in :mod:`meshrt.ops.gemm` and :mod:`meshrt.ops.grouped` price every step they execute
with the per-step functions below; the ``estimate_*`` functions apply the same functions to the
whole schedule, derived from the shapes alone, so they predict paper-scale meshes (720 x 720)
in milliseconds. Tests tie the two together exactly on meshes small enough to emulate.

What each kernel costs on the wafer (``Nl = lcm(Py, Px)``; ``c = Nl/Px`` columns and ``r = Nl/Py``
rows of logical cores per virtual core; logical tiles ``tmb x tkb``, ``tkb x tnb``):

==========  =====================================  ===========================  ===============
kernel      per step (``Nl`` steps)                 critical path per step       routes per core
==========  =====================================  ===========================  ===============
MeshGEMM    MAC ``rc tmb tkb tnb`` overlapped with  2 hops (interleaved ring)    3 per ring, 12
            one A (x) and one B (y) ring shift
Cannon      as MeshGEMM                             ``P - 1`` hops (wrap link)   2 per ring, 8
SUMMA       x and y multicasts, then MAC            ``max(r, P-1-r)`` hops       ``Py + Px``
dist-GEMM-T MAC overlapped with a B (y) ring        2 hops, then a chain reduce  3 + 2
            shift, then a chain reduce along x      of ``<= Px - 1`` hops
==========  =====================================  ===========================  ===============

MeshGEMM and Cannon first skew A on the mesh in ``Nl // 2`` uniform rounds (as the paper's code
does; lines that need fewer rounds resend a stale buffer). A ring step moves, per physical link
and direction, the logical tiles whose edge crosses that link: one per logical line for these
rings. Communication streams are pipelined, so a message's length is paid once per step.
SUMMA's multicasts need one route per possible root; when that exceeds the device's routing
paths the multicast must be relayed in software, so each hop also costs a routing stage.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable

import numpy as np

from ..collectives import broadcast_cost
from ..mesh import ring_order
from ..plmr import WSE2, Cost, Device, Ledger
from ._lines import physical_hops, physical_load, ring_dest, ring_positions
from ._tiles import GemmTiling

COLOURS_PER_RING = {"interleaved": 3, "linear": 2}
KERNEL_RINGS = {"meshgemm": "interleaved", "cannon": "linear"}


def record(ledger: Ledger, name: str, costs) -> None:
    """Charge ``[(op, Cost), ...]`` into ``ledger`` under ``name/op`` (empty costs skipped),
    all of kernel ``name``."""
    with ledger.running(name):
        for op, c in costs:
            if c.count:
                ledger.charge(f"{name}/{op}", c)


def _comm_cycles(device: Device, c: Cost) -> float:
    return Ledger(device).step_cycles(words=c.words, hops=c.hops, routings=c.routings)[2]


def _worse(device: Device, *options: Cost) -> Cost:
    """The transfer that takes longest (the first one on a tie)."""
    return max(options, key=lambda o: _comm_cycles(device, o))


def ring_transfer(
    nl: int, kind: str, refine: int, lines: int, tile_words: int, reverse: bool = False
) -> Cost:
    """One ring step's transfer on the critical link (words and hops).

    ``refine`` logical cores per virtual core along the ring; ``lines`` logical lines per virtual
    core move at once, each a ``tile_words`` tile.
    """
    dest = ring_dest(nl, kind, reverse)
    return Cost(
        words=physical_load(dest, refine) * lines * tile_words, hops=physical_hops(dest, refine)
    )


# ----------------------------------------------------------------------------------------------
# MeshGEMM and Cannon
# ----------------------------------------------------------------------------------------------


def skew_rounds(plan: GemmTiling) -> int:
    """Uniform rounds of the on-mesh skew: every line moves at most ``Nl // 2`` ring steps."""
    return plan.nl // 2


@functools.lru_cache(maxsize=1024)
def shift_gemm_costs(
    plan: GemmTiling, kind: str, b_preskewed: bool, device: Device, a_factor: int = 1
) -> tuple:
    """Skew and main-loop costs of MeshGEMM (``kind="interleaved"``) or Cannon (``"linear"``).

    ``a_factor``: A tiles are that many times longer than ``tmb x tkb`` (grouped MeshGEMM).
    Every argument is immutable and so is the result: a layer's GEMMs of one shape are priced
    once (each prefill layer repeats the same shapes).
    """
    nl, cols, rows = plan.nl, plan.cols_per_core, plan.rows_per_core
    tile_a, tile_b = plan.tmb * plan.tkb * a_factor, plan.tkb * plan.tnb
    x_fwd = ring_transfer(nl, kind, cols, rows, tile_a)
    y_fwd = ring_transfer(nl, kind, rows, cols, tile_b)
    skew = [x_fwd, ring_transfer(nl, kind, cols, rows, tile_a, reverse=True)]
    if not b_preskewed:
        skew += [y_fwd, ring_transfer(nl, kind, rows, cols, tile_b, reverse=True)]
    shift = _worse(device, x_fwd, y_fwd)
    return (
        ("skew", _worse(device, *skew).with_(tasks=1) * skew_rounds(plan)),
        (
            "step",
            shift.with_(
                macs=cols * rows * plan.tmb * plan.tkb * plan.tnb,
                overlap=True,
                count=nl,
                vectors=cols * rows * plan.tkb * plan.tnb,
                tasks=1,
            ),
        ),
    )


def shift_gemm_memory(plan: GemmTiling) -> int:
    """Words per core: double-buffered A and B tiles plus the C tile."""
    a_words = plan.tile_a[0] * plan.tile_a[1]
    b_words = plan.tile_b[0] * plan.tile_b[1]
    return 2 * a_words + 2 * b_words + plan.tile_c[0] * plan.tile_c[1]


def shift_gemm_routes(plan: GemmTiling, kind: str, b_preskewed: bool) -> int:
    """Routing paths per core: the x and y rings, plus forward and reverse skew rings."""
    rings = (plan.px > 1) * 3 + (plan.py > 1) * (1 if b_preskewed else 3)
    return COLOURS_PER_RING[kind] * rings


def charge_shift_gemm(led: Ledger, name: str, plan: GemmTiling, kind: str, b_preskewed: bool):
    """Write the records of a MeshGEMM or Cannon run (``kind``: its ring) on ``plan``: its
    steps, its memory per core and its routing paths. The kernels and the estimators charge
    this, and only this."""
    record(led, name, shift_gemm_costs(plan, kind, b_preskewed, led.device))
    led.memory(name, shift_gemm_memory(plan))
    led.routes(name, shift_gemm_routes(plan, kind, b_preskewed))


def _estimate_shift_gemm(kernel, m, k, n, mesh, device, b_preskewed, ledger, name):
    led = ledger if ledger is not None else Ledger(device or WSE2)
    plan = GemmTiling.for_shapes(m, k, n, mesh)
    charge_shift_gemm(led, name, plan, KERNEL_RINGS[kernel], b_preskewed)
    return led


def estimate_meshgemm(
    m: int,
    k: int,
    n: int,
    mesh: tuple[int, int],
    device: Device | None = None,
    b_preskewed: bool = True,
    ledger: Ledger | None = None,
    name: str = "meshgemm",
) -> Ledger:
    """The ledger :func:`meshrt.ops.gemm.meshgemm` writes for ``[m, k] @ [k, n]`` on ``mesh``."""
    return _estimate_shift_gemm("meshgemm", m, k, n, mesh, device, b_preskewed, ledger, name)


def estimate_cannon(
    m: int,
    k: int,
    n: int,
    mesh: tuple[int, int],
    device: Device | None = None,
    b_preskewed: bool = True,
    ledger: Ledger | None = None,
    name: str = "cannon",
) -> Ledger:
    """The ledger :func:`meshrt.ops.gemm.cannon` writes for ``[m, k] @ [k, n]`` on ``mesh``."""
    return _estimate_shift_gemm("cannon", m, k, n, mesh, device, b_preskewed, ledger, name)


# ----------------------------------------------------------------------------------------------
# SUMMA
# ----------------------------------------------------------------------------------------------


def summa_roots(plan: GemmTiling, kb: int) -> tuple[int, int]:
    """``(column, row)`` of the cores that own the ``kb``-th K block of A and of B."""
    return kb // plan.cols_per_core, kb // plan.rows_per_core


def summa_step(plan: GemmTiling, kb: int, device: Device) -> Cost:
    """Transfer of step ``kb``'s two concurrent multicasts (the slower one)."""
    col, row = summa_roots(plan, kb)
    tm, tn = plan.tile_c
    relay = plan.px + plan.py > device.routing_paths
    out = []
    for cost in (
        broadcast_cost(plan.px, col, tm * plan.tkb),
        broadcast_cost(plan.py, row, plan.tkb * tn),
    ):
        out.append(
            Cost(words=cost.words, hops=cost.hops, routings=cost.hops if relay else cost.routings)
        )
    return _worse(device, *out)


def summa_costs(plan: GemmTiling, steps: Counter) -> list:
    """Step costs from a tally ``{transfer Cost: count}`` of executed steps."""
    macs = plan.tile_c[0] * plan.tkb * plan.tile_c[1]
    vectors = plan.tkb * plan.tile_c[1]
    return [
        ("step", t.with_(macs=macs, count=c, vectors=vectors, tasks=1))
        for t, c in sorted(steps.items(), key=lambda tc: tc[0].step())
    ]


def summa_memory(plan: GemmTiling) -> int:
    """Words per core: A, B and C tiles plus the two received panels (peak memory grows)."""
    tm, tn = plan.tile_c
    return tm * plan.tile_a[1] + plan.tile_b[0] * tn + tm * tn + tm * plan.tkb + plan.tkb * tn


def summa_routes(plan: GemmTiling) -> int:
    """One multicast route per possible root of the core's row and column."""
    return (plan.px if plan.px > 1 else 0) + (plan.py if plan.py > 1 else 0)


def estimate_summa(
    m: int,
    k: int,
    n: int,
    mesh: tuple[int, int],
    device: Device | None = None,
    ledger: Ledger | None = None,
    name: str = "summa",
) -> Ledger:
    """The ledger :func:`meshrt.ops.gemm.summa` writes for ``[m, k] @ [k, n]`` on ``mesh``."""
    led = ledger if ledger is not None else Ledger(device or WSE2)
    plan = GemmTiling.for_shapes(m, k, n, mesh)
    tally = Counter(summa_step(plan, kb, led.device) for kb in range(plan.nl))
    record(led, name, summa_costs(plan, tally))
    led.memory(name, summa_memory(plan))
    led.routes(name, summa_routes(plan))
    return led


# ----------------------------------------------------------------------------------------------
# dist-GEMM-T
# ----------------------------------------------------------------------------------------------


def gemm_t_segments(plan: GemmTiling, t: int) -> np.ndarray:
    """Sequence segment of B held by every logical row at step ``t``; ``[Nl]``.

    B rotates forward on the interleaved ring with no skew, so logical row ``i`` holds segment
    ``L[(pos(i) - t) mod Nl]``. Its chain reduce goes to the logical column of that segment,
    which lives on virtual column ``segment // cols_per_core``.
    """
    nl = plan.nl
    return ring_order(nl)[(ring_positions(nl, "interleaved") - t) % nl]


def gemm_t_step(plan: GemmTiling) -> tuple:
    """Local ``A_tile @ B_tile^T`` for the ``rows_per_core`` logical rows, overlapped with the
    B ring shift.

    ``plan`` describes ``C[M, N] = A[M, D] @ B[N, D]^T`` with ``tkb`` the logical D segment.
    """
    rows = plan.rows_per_core
    d_tile = plan.cols_per_core * plan.tkb
    shift = ring_transfer(plan.nl, "interleaved", rows, 1, plan.tnb * d_tile)
    return "step", shift.with_(
        macs=rows * plan.tmb * d_tile * plan.tnb,
        overlap=True,
        count=plan.nl,
        vectors=rows * d_tile * plan.tnb,
        tasks=1,
    )


def pipelined_reduces(reduces: Counter) -> list:
    """Costs of a sequence of chain reduces, tallied ``{Cost: count}``.

    On the wafer a chain reduce is a stream: each core adds its partial to the words passing by
    and forwards them, and the next step's stream follows the previous one on the same links.
    So every step pays its stream (words and adds), and the latency of the longest chain (hops
    and routing stages) is paid once, when the last stream drains.
    """
    steps = sum(reduces.values())
    if not steps:
        return []
    words = max(k.words for k in reduces)
    macs = max(k.macs for k in reduces)
    hops = max(k.hops for k in reduces)
    routings = max(k.routings for k in reduces)
    return [
        ("reduce", Cost(macs=macs, words=words, overlap=True, count=steps)),
        ("reduce_drain", Cost(hops=hops, routings=routings)),
    ]


def gemm_t_routes(plan: GemmTiling) -> int:
    """The y ring (3 colours) and the two chain directions along x."""
    return (3 if plan.py > 1 else 0) + (2 if plan.px > 1 else 0)


ESTIMATORS: dict[str, Callable[..., Ledger]] = {
    "meshgemm": estimate_meshgemm,
    "cannon": estimate_cannon,
    "summa": estimate_summa,
}
