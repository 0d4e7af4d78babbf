"""``python -m meshrt bench {fabric,gemv,gemm,model,calibrate}``.

Two kinds of figures, never mixed up:

* **emulator wall time** on this machine (median over ``--repeat`` runs after ``--warmup``; each
  run is timed from a barrier to the slowest rank), always beside a baseline measured in the same
  run on the same data (a raw ``Sendrecv`` loop, ``numpy`` copies, a single-process ``numpy``
  product);
* **modeled wafer time** from the PLMR ledger for the chosen ``--device``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from . import runtime
from .collectives import ALLREDUCES, AllreduceSpec
from .ops.gemm import ALGOS as GEMM_ALGOS

#: Algorithms each benchmark runs: the GEMV's allreduces, the GEMM kernels.
ALGOS = {"gemv": tuple(ALLREDUCES), "gemm": GEMM_ALGOS}


#: The virtual mesh of each benchmark when none is given.
DEFAULT_MESH = {"fabric": "512x512", "gemv": "128x128", "gemm": "64x64"}


@dataclass(frozen=True)
class BenchSpec:
    """How a kernel benchmark runs.

    Attributes
    ----------
    repeat, warmup : int
        Timed runs (median reported) and untimed runs first.
    device : str
        PLMR device of the modeled time: ``wse2``, ``wse3`` or ``NAME:field=value,...``.
    algos : tuple of str
        Algorithms to run, names of :data:`ALGOS` (empty: the benchmark's default).
    size : int or None
        Matrix size N (gemv ``[1,N]x[N,N]``, gemm ``NxNxN``; ``None``: 8192 / 4096).
    tile : int
        fabric: tile side per core.
    groups, levels : int
        K-tree first-level group count (``None``: about the square root of the line), levels.
    check : bool
        Compare with numpy and report the largest error.
    emulation : str or None
        The fabrics' mover (:mod:`meshrt.movers`; ``None``: the default).
    """

    repeat: int = 5
    warmup: int = 1
    device: str = "wse2"
    algos: tuple = ()
    size: int | None = None
    tile: int = 16
    groups: int | None = None
    levels: int = 2
    check: bool = False
    emulation: str | None = None


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def _timed(fn, comm, repeat: int, warmup: int) -> float:
    """Median over ``repeat`` runs of the slowest rank's wall time, in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if comm is not None:
            comm.Barrier()
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        if comm is not None:
            from mpi4py import MPI

            dt = comm.allreduce(dt, op=MPI.MAX)
        times.append(dt)
    return statistics.median(times)


# ----------------------------------------------------------------------------------------------
# fabric
# ----------------------------------------------------------------------------------------------


def bench_fabric(lay, spec: BenchSpec, comm, log) -> list[dict]:
    """Ring shifts and allreduces on the layout ``lay`` (a :class:`MeshLayout`) against a raw
    ``Sendrecv`` loop and numpy copies of the same bytes."""
    from .collectives import allreduce
    from .fabric import Fabric

    rank, _ = runtime.rank_and_size(comm)
    fab = Fabric(comm, lay, mover=spec.emulation)
    t = spec.tile
    block = np.random.default_rng(rank).standard_normal((lay.by, lay.bx, t, t)).astype(np.float32)
    mb = block.nbytes / 2**20
    log.info(f"fabric bench: {lay}, tile {t}x{t} f32, {mb:.1f} MiB per rank")
    rows = []

    def raw(axis):
        """The same bytes as a two-core halo exchange by raw Sendrecv, plus a numpy copy."""

        def go():
            slab = [slice(None)] * 4
            slab[axis] = slice(0, 2)
            edge = np.ascontiguousarray(block[tuple(slab)])
            if fab.cart is not None:
                for side in (-1, 1):
                    dst, src = fab.peer(axis, side), fab.peer(axis, -side)
                    from mpi4py import MPI

                    out = np.empty_like(edge)
                    fab.cart.Sendrecv(
                        edge,
                        dest=MPI.PROC_NULL if dst is None else dst,
                        recvbuf=out,
                        source=MPI.PROC_NULL if src is None else src,
                    )
            np.copyto(np.empty_like(block), block)

        return go

    for axis, name in ((1, "x"), (0, "y")):
        t_ring = _timed(lambda: fab.ring_shift(block, axis), comm, spec.repeat, spec.warmup)
        t_raw = _timed(raw(axis), comm, spec.repeat, spec.warmup)
        t_copy = _timed(lambda: block.copy(), comm, spec.repeat, spec.warmup)
        rows.append(
            {
                "bench": f"ring_shift_{name}",
                "mesh": f"{lay.py}x{lay.px}",
                "ranks": f"{lay.ry}x{lay.rx}",
                "tile": t,
                "block_mib": mb,
                "seconds": t_ring,
                "raw_sendrecv_plus_copy_s": t_raw,
                "numpy_copy_s": t_copy,
                "ratio_vs_raw": t_ring / t_raw,
                "ratio_vs_copy": t_ring / t_copy,
                "modeled_s": None,
            }
        )
    vec = block.reshape(lay.by, lay.bx, -1)[..., :t]
    for algo in ("ktree", "pipeline"):
        fab.ledger.reset()
        ar = AllreduceSpec.of(algo, spec.groups, spec.levels)
        t_ar = _timed(lambda: allreduce(fab, vec, 0, spec=ar), comm, spec.repeat, spec.warmup)
        t_sum = _timed(
            lambda: np.broadcast_to(vec.sum(0, keepdims=True), vec.shape).copy(),
            comm,
            spec.repeat,
            spec.warmup,
        )
        per_call = fab.ledger.seconds / (spec.repeat + spec.warmup)
        rows.append(
            {
                "bench": f"allreduce_{algo}_y",
                "mesh": f"{lay.py}x{lay.px}",
                "ranks": f"{lay.ry}x{lay.rx}",
                "vector": t,
                "seconds": t_ar,
                "numpy_local_sum_s": t_sum,
                "ratio_vs_local_sum": t_ar / t_sum,
                "modeled_s": per_call,
            }
        )
    return rows


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------


def bench_gemv(lay, spec: BenchSpec, comm, log) -> list[dict]:
    """MeshGEMV ``[1,N]x[N,N]`` per algorithm on ``lay`` against a numpy product."""
    from . import hostio
    from .fabric import Fabric
    from .ops import gemv as G
    from .plmr import Ledger, get_device

    n = spec.size or 8192
    mesh = (lay.py, lay.px)
    rng = np.random.default_rng(0)
    w = rng.standard_normal((n, n), dtype=np.float32)
    x = rng.standard_normal(n, dtype=np.float32)
    t_np = _timed(lambda: x @ w, None, spec.repeat, spec.warmup)
    rows = []
    for algo in spec.algos or ("ktree",):
        fab = Fabric(comm, lay, ledger=Ledger(get_device(spec.device)), mover=spec.emulation)
        wb = hostio.local_block(fab, G.weight_tiles(w, mesh, "y"))
        xb = hostio.local_block(fab, G.vector_tiles(x, mesh, "y"))
        log.info(f"gemv {algo}: [1,{n}]x[{n},{n}] on {lay}")
        ar = AllreduceSpec.of(algo, spec.groups, spec.levels)
        t = _timed(lambda: G.meshgemv(fab, xb, wb, "y", ar), comm, spec.repeat, spec.warmup)
        est = G.estimate_meshgemv(n, n, mesh, get_device(spec.device), spec=ar)
        row = {
            "bench": "gemv",
            "algo": algo,
            "n": n,
            "mesh": f"{lay.py}x{lay.px}",
            "ranks": f"{lay.ry}x{lay.rx}",
            "seconds": t,
            "numpy_s": t_np,
            "ratio_vs_numpy": t / t_np,
            "modeled_s": est.seconds,
            "modeled_comm_fraction": est.totals().comm_cycles / max(est.cycles, 1e-30),
        }
        if spec.check:
            yb = G.meshgemv(fab, xb, wb, "y", ar)
            tiles = hostio.gather(fab, yb)
            if tiles is not None:  # rank 0
                row["max_abs_err"] = float(np.abs(G.vector_from_tiles(tiles, n, "x") - x @ w).max())
        rows.append(row)
    return rows


def bench_gemm(lay, spec: BenchSpec, comm, log) -> list[dict]:
    """MeshGEMM, Cannon or SUMMA ``NxNxN`` on ``lay`` against a numpy product."""
    from . import hostio
    from .fabric import Fabric
    from .ops import gemm as M
    from .ops.estimate import ESTIMATORS
    from .plmr import Ledger, get_device

    mesh = (lay.py, lay.px)
    n = spec.size or 4096
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    t_np = _timed(lambda: a @ b, None, spec.repeat, spec.warmup)
    kernels: dict[str, Callable[..., np.ndarray]] = {
        "meshgemm": M.meshgemm,
        "cannon": M.cannon,
        "summa": M.summa,
    }
    rows = []
    for algo in spec.algos or ("meshgemm",):
        if algo not in kernels:
            raise ValueError(f"gemm algorithm {algo!r}: choose from {', '.join(kernels)}")
        fab = Fabric(comm, lay, ledger=Ledger(get_device(spec.device)), mover=spec.emulation)
        log.info(f"gemm {algo}: {n}^3 on {lay}")
        ab = hostio.local_block(fab, M.prepare_a(a, mesh))
        bb = hostio.local_block(fab, M.prepare_b(b, mesh, algo))
        t = _timed(lambda: kernels[algo](fab, ab, bb), comm, spec.repeat, spec.warmup)
        est = ESTIMATORS[algo](n, n, n, mesh, get_device(spec.device))
        row = {
            "bench": "gemm",
            "algo": algo,
            "emulation": fab.mover.name,
            "n": n,
            "mesh": f"{lay.py}x{lay.px}",
            "ranks": f"{lay.ry}x{lay.rx}",
            "seconds": t,
            "numpy_s": t_np,
            "ratio_vs_numpy": t / t_np,
            "modeled_s": est.seconds,
            "modeled_comm_fraction": est.totals().comm_cycles / max(est.cycles, 1e-30),
        }
        if spec.check:
            c = hostio.gather_matrix(fab, kernels[algo](fab, ab, bb), (n, n))
            if c is not None:  # rank 0
                row["max_abs_err"] = float(np.abs(c - a @ b).max())
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------
# modeled sweeps (closed form, paper scale)
# ----------------------------------------------------------------------------------------------


def model_rows(kernel: str, sides, sizes, algos, device, levels=2) -> list[dict]:
    """Modeled time of each (algorithm, size, mesh side) from the analytic estimators."""
    rows = []
    for n in sizes:
        for side in sides:
            for algo in algos:
                if kernel == "gemv":
                    from .ops.gemv import estimate_meshgemv

                    led = estimate_meshgemv(
                        n, n, (side, side), device, spec=AllreduceSpec(algo, levels=levels)
                    )
                else:
                    from .ops.estimate import ESTIMATORS

                    led = ESTIMATORS[algo](n, n, n, (side, side), device)
                t = led.totals()
                rows.append(
                    {
                        "kernel": kernel,
                        "algo": algo,
                        "n": n,
                        "side": side,
                        "cycles": led.cycles,
                        "ms": led.seconds * 1e3,
                        "compute_cycles": t.compute_cycles,
                        "comm_cycles": t.comm_cycles,
                        "efficiency": t.macs / max(led.cycles * device.macs_per_cycle, 1e-30),
                        "max_hops_per_step": max(
                            (o.hops / o.steps for o in led.ops.values() if o.steps), default=0
                        ),
                        "peak_kib_per_core": led.peak_memory / 1024,
                        "routes": led.max_routes,
                        "violations": "; ".join(led.violations()),
                    }
                )
    return rows


#: How to get matplotlib, for every ``--plot``.
PLOT_INSTALL = "make install-plot, or pip install 'waferllm-mpi[plot]'"


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend; ``UsageError`` (exit 2) naming how to install
    it if it is missing, so that ``--plot`` never ends quietly without its file."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise runtime.UsageError(f"--plot needs matplotlib: {PLOT_INSTALL}") from None
    return plt


def plot_rows(rows: list[dict], path: str, title: str) -> bool:
    plt = pyplot()
    sizes = sorted({r["n"] for r in rows})
    fig, axes = plt.subplots(1, len(sizes), figsize=(4.5 * len(sizes), 3.6), squeeze=False)
    for ax, n in zip(axes[0], sizes):
        for algo in sorted({r["algo"] for r in rows}):
            pts = [(r["side"], r["ms"]) for r in rows if r["n"] == n and r["algo"] == algo]
            ax.plot(*zip(*pts), marker="o", label=algo)
        ax.set_title(f"{title} {n}")
        ax.set_xlabel("mesh side (cores)")
        ax.set_ylabel("modeled time (ms)")
        ax.set_yscale("log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def bench_model(
    kernel: str, sides, sizes, spec: BenchSpec, plot: str | None = None, comm=None
) -> list[dict]:
    """Modeled time against mesh side (no emulation); ``sizes`` empty: the kernel's defaults;
    ``plot``: a PNG path, drawn on rank 0."""
    from .plmr import get_device

    device = get_device(spec.device)
    if plot:
        pyplot()  # before any work: missing matplotlib is bad input
    if kernel == "gemv":
        sizes = list(sizes or (2048, 8192, 16384, 32768))
        algos = list(spec.algos or ALGOS["gemv"])
    else:
        sizes = list(sizes or (2048, 8192))
        algos = list(spec.algos or ALGOS["gemm"])
    rows = model_rows(kernel, list(sides), sizes, algos, device, spec.levels)
    if plot and runtime.rank_and_size(comm)[0] == 0:
        plot_rows(rows, plot, f"{kernel.upper()} on {device.name}")
    return rows
