"""``python -m meshrt bench {fabric,gemv,gemm,model,calibrate}``.

Two kinds of figures, never mixed up:

* **emulator wall time** on this machine (median over ``--repeat`` runs after ``--warmup``; each
  run is timed from a barrier to the slowest rank), always beside a baseline measured in the same
  run on the same data (a raw ``Sendrecv`` loop, ``numpy`` copies, a single-process ``numpy``
  product);
* **modeled wafer time** from the PLMR ledger for the chosen ``--device``.
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time

import numpy as np

from . import runtime
from .collectives import AllreduceSpec


#: Algorithms each benchmark runs; ``meshgemv`` is the paper's name of the K-tree GEMV.
ALGOS = {"gemv": ("ktree", "pipeline", "ring"), "gemm": ("meshgemm", "cannon", "summa")}
ALGO_ALIASES = {"meshgemv": "ktree"}


def _count(minimum: int):
    """argparse type: an integer >= ``minimum``."""
    def check(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be >= {minimum}")
        return value
    return check


def _sizes(text: str) -> str:
    """argparse type: a comma-separated list of positive integers (kept as text)."""
    parts = [p.strip() for p in text.split(",")]
    bad = [p for p in parts if not p.isdigit() or int(p) <= 0]
    if bad:
        raise argparse.ArgumentTypeError(f"{bad[0]!r} is not a positive integer (give a "
                                         "comma-separated list such as 60,120)")
    return text


def check_args(args) -> None:
    """Validate what argparse cannot see alone (``--algo`` per benchmark, ``--device``)
    before any work; raises :class:`runtime.UsageError`. ``args.algo`` is normalised."""
    kernel = args.kernel if args.what == "model" else args.what
    if args.algo is not None:
        if kernel not in ALGOS:
            raise runtime.UsageError(f"--algo does not apply to bench {args.what}")
        names = [a.strip().lower() for a in args.algo.split(",")]
        if kernel == "gemv":
            names = [ALGO_ALIASES.get(a, a) for a in names]
        unknown = [a for a in names if a not in ALGOS[kernel]]
        if unknown:
            raise runtime.UsageError(f"--algo {unknown[0]!r}: {kernel} algorithms are "
                                     f"{', '.join(ALGOS[kernel])}"
                                     + (" (meshgemv = ktree)" if kernel == "gemv" else ""))
        args.algo = ",".join(dict.fromkeys(names))
    from .plmr import get_device
    try:
        get_device(args.device)
    except ValueError as e:
        raise runtime.UsageError(f"--device {args.device}: {e}") from None


def add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks: emulator wall time and modeled wafer time",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description=__doc__)
    p.add_argument("what", choices=["fabric", "gemv", "gemm", "model", "calibrate"],
                   help="fabric: shifts and allreduce vs raw MPI and numpy copies; gemv/gemm: a "
                        "kernel vs numpy on the same matrices; model: modeled time vs mesh side "
                        "(no emulation); calibrate: how the device constants were derived")
    p.add_argument("--mesh", default=None, metavar="PYxPX",
                   help="virtual mesh (default: 512x512 for fabric, 128x128 gemv, 64x64 gemm)")
    p.add_argument("--ranks", default=None, metavar="RYxRX", help="rank grid (default: squarest)")
    p.add_argument("--algo", default=None,
                   help="gemv: ktree|pipeline|ring (default ktree; meshgemv = ktree); gemm: "
                        "meshgemm|cannon|summa; comma-separated lists allowed")
    p.add_argument("--size", type=_count(1), default=None,
                   help="matrix size N (gemv: [1,N]x[N,N], gemm: NxNxN; default 8192 / 4096)")
    p.add_argument("--tile", type=_count(1), default=16,
                   help="fabric: tile side per core (default 16)")
    p.add_argument("--groups", type=_count(1), default=None, help="K-tree first-level group count")
    p.add_argument("--levels", type=_count(1), default=2, help="K-tree levels (default 2)")
    p.add_argument("--device", default="wse2", help="device preset (wse2, wse3, or "
                                                    "NAME:field=value,... overrides)")
    p.add_argument("--sides", type=_sizes, default="60,120,180,240,360,480,600,720",
                   help="model: mesh sides to sweep")
    p.add_argument("--sizes", type=_sizes, default=None,
                   help="model: matrix sizes (default gemm 2048,8192; gemv 2048,8192,16384,32768)")
    p.add_argument("--kernel", choices=["gemm", "gemv"], default="gemv", help="model: which kernel")
    p.add_argument("--check", action="store_true", help="compare with numpy, print the max error")
    p.add_argument("--repeat", type=_count(1), default=5, help="timed runs (median reported)")
    p.add_argument("--warmup", type=_count(0), default=1, help="untimed runs first")
    p.add_argument("--json", metavar="FILE", default=None, help="write results as JSON ('-' = stdout)")
    p.add_argument("--csv", metavar="FILE", default=None, help="write results as CSV")
    p.add_argument("--plot", metavar="PNG", default=None, help="model: plot (needs matplotlib)")


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


def _layout(args, default_mesh: str, nranks: int):
    from .__main__ import layout_from_args
    if args.mesh is None:
        args.mesh = default_mesh
    return layout_from_args(args, nranks)


def _emit(rows: list[dict], args, rank: int) -> None:
    if rank != 0:
        return
    if args.json:
        text = json.dumps(rows, indent=2)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text + "\n")
    if args.csv and rows:
        keys = sorted({k for r in rows for k in r})
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)


# ----------------------------------------------------------------------------------------------
# fabric
# ----------------------------------------------------------------------------------------------

def bench_fabric(args, comm, log) -> list[dict]:
    from .collectives import allreduce
    from .fabric import Fabric
    rank, size = runtime.rank_and_size(comm)
    lay = _layout(args, "512x512", size)
    fab = Fabric(comm, lay)
    t = args.tile
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
                    fab.cart.Sendrecv(edge, dest=MPI.PROC_NULL if dst is None else dst,
                                      recvbuf=out, source=MPI.PROC_NULL if src is None else src)
            np.copyto(np.empty_like(block), block)
        return go

    for axis, name in ((1, "x"), (0, "y")):
        t_ring = _timed(lambda: fab.ring_shift(block, axis), comm, args.repeat, args.warmup)
        t_raw = _timed(raw(axis), comm, args.repeat, args.warmup)
        t_copy = _timed(lambda: block.copy(), comm, args.repeat, args.warmup)
        rows.append({"bench": f"ring_shift_{name}", "mesh": f"{lay.py}x{lay.px}",
                     "ranks": f"{lay.ry}x{lay.rx}", "tile": t, "block_mib": mb,
                     "seconds": t_ring, "raw_sendrecv_plus_copy_s": t_raw, "numpy_copy_s": t_copy,
                     "ratio_vs_raw": t_ring / t_raw, "ratio_vs_copy": t_ring / t_copy,
                     "modeled_s": None})
    vec = block.reshape(lay.by, lay.bx, -1)[..., :t]
    for algo in ("ktree", "pipeline"):
        fab.ledger.reset()
        spec = (AllreduceSpec(algo, args.groups, args.levels) if algo == "ktree"
                else AllreduceSpec(algo))
        t_ar = _timed(lambda: allreduce(fab, vec, 0, spec=spec), comm, args.repeat, args.warmup)
        t_sum = _timed(lambda: np.broadcast_to(vec.sum(0, keepdims=True), vec.shape).copy(),
                       comm, args.repeat, args.warmup)
        per_call = fab.ledger.seconds / (args.repeat + args.warmup)
        rows.append({"bench": f"allreduce_{algo}_y", "mesh": f"{lay.py}x{lay.px}",
                     "ranks": f"{lay.ry}x{lay.rx}", "vector": t, "seconds": t_ar,
                     "numpy_local_sum_s": t_sum, "ratio_vs_local_sum": t_ar / t_sum,
                     "modeled_s": per_call})
    return rows


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------

def bench_gemv(args, comm, log) -> list[dict]:
    from . import darray
    from .fabric import Fabric
    from .ops import gemv as G
    from .plmr import Ledger, get_device
    rank, size = runtime.rank_and_size(comm)
    lay = _layout(args, "128x128", size)
    n = args.size or 8192
    mesh = (lay.py, lay.px)
    rng = np.random.default_rng(0)
    w = rng.standard_normal((n, n), dtype=np.float32)
    x = rng.standard_normal(n, dtype=np.float32)
    t_np = _timed(lambda: x @ w, None, args.repeat, args.warmup)
    rows = []
    for algo in (args.algo or "ktree").split(","):
        fab = Fabric(comm, lay, ledger=Ledger(get_device(args.device)))
        wb = darray.local_block(fab, G.weight_tiles(w, mesh, "y"))
        xb = darray.local_block(fab, G.vector_tiles(x, mesh, "y"))
        log.info(f"gemv {algo}: [1,{n}]x[{n},{n}] on {lay}")
        spec = AllreduceSpec(algo, args.groups, args.levels)
        t = _timed(lambda: G.meshgemv(fab, xb, wb, "y", spec), comm, args.repeat, args.warmup)
        est = G.estimate_meshgemv(n, n, mesh, get_device(args.device), spec=spec)
        row = {"bench": "gemv", "algo": algo, "n": n, "mesh": f"{lay.py}x{lay.px}",
               "ranks": f"{lay.ry}x{lay.rx}", "seconds": t, "numpy_s": t_np,
               "ratio_vs_numpy": t / t_np, "modeled_s": est.seconds,
               "modeled_comm_fraction": est.totals().comm_cycles / max(est.cycles, 1e-30)}
        if args.check:
            yb = G.meshgemv(fab, xb, wb, "y", spec)
            tiles = darray.gather(fab, yb)
            if rank == 0:
                row["max_abs_err"] = float(np.abs(G.vector_from_tiles(tiles, n, "x") - x @ w).max())
        rows.append(row)
    return rows


def bench_gemm(args, comm, log) -> list[dict]:
    from . import darray
    from .fabric import Fabric
    from .ops import gemm as M
    from .ops.estimate import ESTIMATORS
    from .plmr import Ledger, get_device
    rank, size = runtime.rank_and_size(comm)
    lay = _layout(args, "64x64", size)
    mesh = (lay.py, lay.px)
    n = args.size or 4096
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    t_np = _timed(lambda: a @ b, None, args.repeat, args.warmup)
    kernels = {"meshgemm": M.meshgemm, "cannon": M.cannon, "summa": M.summa}
    rows = []
    for algo in (args.algo or "meshgemm").split(","):
        if algo not in kernels:
            raise runtime.UsageError(f"--algo {algo!r}: choose from {', '.join(kernels)}")
        fab = Fabric(comm, lay, ledger=Ledger(get_device(args.device)))
        log.info(f"gemm {algo}: {n}^3 on {lay}")
        ab = darray.local_block(fab, M.prepare_a(a, mesh))
        bb = darray.local_block(fab, M.prepare_b(b, mesh, algo))
        t = _timed(lambda: kernels[algo](fab, ab, bb), comm, args.repeat, args.warmup)
        est = ESTIMATORS[algo](n, n, n, mesh, get_device(args.device))
        row = {"bench": "gemm", "algo": algo, "n": n, "mesh": f"{lay.py}x{lay.px}",
               "ranks": f"{lay.ry}x{lay.rx}", "seconds": t, "numpy_s": t_np,
               "ratio_vs_numpy": t / t_np, "modeled_s": est.seconds,
               "modeled_comm_fraction": est.totals().comm_cycles / max(est.cycles, 1e-30)}
        if args.check:
            c = darray.gather_matrix(fab, kernels[algo](fab, ab, bb), (n, n))
            if rank == 0:
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
                    led = estimate_meshgemv(n, n, (side, side), device,
                                            spec=AllreduceSpec(algo, levels=levels))
                else:
                    from .ops.estimate import ESTIMATORS
                    led = ESTIMATORS[algo](n, n, n, (side, side), device)
                t = led.totals()
                rows.append({"kernel": kernel, "algo": algo, "n": n, "side": side,
                             "cycles": led.cycles, "ms": led.seconds * 1e3,
                             "compute_cycles": t.compute_cycles, "comm_cycles": t.comm_cycles,
                             "efficiency": t.macs / max(led.cycles * device.macs_per_cycle, 1e-30),
                             "max_hops_per_step": max((o.hops / o.steps for o in led.ops.values()
                                                       if o.steps), default=0),
                             "peak_kib_per_core": led.peak_memory / 1024,
                             "routes": led.max_routes, "violations": "; ".join(led.violations())})
    return rows


def plot_rows(rows: list[dict], path: str, title: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install '.[plot]'); no plot written",
              file=sys.stderr)
        return False
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


def bench_model(args, comm, log) -> list[dict]:
    from .plmr import get_device
    device = get_device(args.device)
    sides = [int(s) for s in args.sides.split(",")]
    if args.kernel == "gemv":
        sizes = [int(s) for s in (args.sizes or "2048,8192,16384,32768").split(",")]
        algos = (args.algo or "ktree,pipeline,ring").split(",")
    else:
        sizes = [int(s) for s in (args.sizes or "2048,8192").split(",")]
        algos = (args.algo or "meshgemm,cannon,summa").split(",")
    rows = model_rows(args.kernel, sides, sizes, algos, device, args.levels)
    if args.plot and runtime.rank_and_size(comm)[0] == 0:
        plot_rows(rows, args.plot, f"{args.kernel.upper()} on {device.name}")
    return rows


def run_bench(args) -> int:
    check_args(args)
    comm = runtime.world()
    rank, _ = runtime.rank_and_size(comm)
    log = runtime.setup_logging(comm)
    if args.what == "calibrate":
        from .calibrate import report
        from .plmr import get_device
        if rank == 0:
            print(report(get_device(args.device)))
            print("  (the full fit, with the decode and KV-capacity points: "
                  "python -m llm estimate --calibration)")
        return 0
    fn = {"fabric": bench_fabric, "gemv": bench_gemv, "gemm": bench_gemm,
          "model": bench_model}[args.what]
    rows = fn(args, comm, log)
    if rank == 0:
        for r in rows:
            print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in r.items() if v is not None))
    _emit(rows, args, rank)
    return 0
