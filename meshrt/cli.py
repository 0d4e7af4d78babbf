"""``python -m meshrt {info,bench}``: the mesh runtime's command line.

Runs the same with one process and under ``mpiexec -n N`` / ``srun``. argparse lives here and
nowhere else in :mod:`meshrt`: the commands turn the parsed arguments into a
:class:`~meshrt.mesh.MeshLayout` and a :class:`~meshrt.bench.BenchSpec` and call
:mod:`meshrt.bench`, which knows nothing of the command line.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys

from . import runtime  # noqa: F401  (sets BLAS threads before numpy loads)
from .movers import DEFAULT_EMULATION, emulations


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are printed once (by rank 0) and end every rank with code 2."""

    def error(self, message):
        raise runtime.UsageError(f"{self.prog}: {message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m meshrt",
        description="A wafer-scale mesh emulated by MPI ranks. Every rank owns a block of virtual "
        "cores; data moves only between neighbouring cores; a PLMR ledger prices "
        "every step as the wafer would.",
        epilog="Examples:\n"
        "  python -m meshrt info --mesh 8x8\n"
        "  mpiexec -n 4 python -m meshrt info --mesh 64x64 --ranks 2x2\n"
        "  python -m meshrt bench fabric --mesh 512x512\n"
        "  mpiexec -n 4 python -m meshrt bench gemm --algo meshgemm --mesh 64x64 --size 4096",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="{info,bench}")

    info = sub.add_parser("info", help="versions, the rank grid and virtual mesh, device presets")
    add_mesh_args(info)
    info.add_argument("--json", action="store_true", help="print JSON instead of text")

    add_bench_parser(sub)
    return p


def add_mesh_args(p: argparse.ArgumentParser, default_mesh: str | None = None) -> None:
    """``--mesh PYxPX`` and ``--ranks RYxRX`` as every mesh command takes them."""
    p.add_argument(
        "--mesh",
        default=default_mesh,
        metavar="PYxPX",
        help="virtual mesh of wafer cores, e.g. 64x64 (default: one core per rank)",
    )
    p.add_argument(
        "--ranks",
        default=None,
        metavar="RYxRX",
        help="MPI rank grid; must multiply to the number of ranks running and divide "
        "the virtual mesh (default: the squarest grid that fits)",
    )


def layout_from_args(mesh: str | None, ranks: str | None, nranks: int):
    """The validated :class:`MeshLayout` named by ``--mesh``/``--ranks`` (``UsageError`` if bad);
    no mesh: one core per rank."""
    from .mesh import MeshError, MeshLayout, default_rank_grid, parse_grid

    try:
        if mesh is not None:
            return MeshLayout.parse(mesh, ranks, nranks)
        if ranks is None:
            ry, rx = default_rank_grid(nranks)
        else:
            ry, rx = parse_grid(ranks, "rank grid")
            if ry * rx != nranks:
                raise MeshError(
                    f"rank grid {ry}x{rx} needs {ry * rx} ranks but {nranks} are running"
                )
        return MeshLayout(ry, rx, ry, rx)
    except MeshError as e:
        raise runtime.UsageError(str(e)) from None


def info(args) -> int:
    import h5py
    import numpy as np

    from .plmr import PRESETS

    comm = runtime.world()
    rank, size = runtime.rank_and_size(comm)
    layout = layout_from_args(args.mesh, args.ranks, size)
    out = {
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "h5py": h5py.__version__,
        "h5py_mpi": bool(h5py.get_config().mpi),
        "ranks": size,
        "rank_grid": f"{layout.ry}x{layout.rx}",
        "virtual_mesh": f"{layout.py}x{layout.px}",
        "cores_per_rank": f"{layout.by}x{layout.bx}",
    }
    try:
        import mpi4py
        from mpi4py import MPI

        out["mpi4py"] = mpi4py.__version__
        out["mpi_library"] = MPI.Get_library_version().splitlines()[0].strip()
        out["mpi_launched"] = runtime.launched_by_mpi()
    except ImportError as e:  # pragma: no cover - mpi4py is a dependency
        out["mpi4py"] = f"not importable: {e}"
    try:
        from threadpoolctl import threadpool_info

        out["blas"] = [
            f"{d.get('internal_api')} {d.get('version')} threads={d.get('num_threads')}"
            for d in threadpool_info()
        ]
    except ImportError:
        out["blas"] = _numpy_blas()
    out["devices"] = {
        k: {
            "cores": f"{d.cores_y}x{d.cores_x}",
            "mem_per_core_kib": d.mem_per_core / 1024,
            "clock_ghz": d.clock_hz / 1e9,
            "alpha": d.alpha,
            "beta": d.beta,
            "macs_per_cycle": d.macs_per_cycle,
            "routing_paths": d.routing_paths,
        }
        for k, d in PRESETS.items()
    }
    if rank == 0:
        if args.json:
            print(json.dumps(out, indent=2))
        else:
            for k, v in out.items():
                if k == "devices":
                    print("devices:")
                    for name, d in v.items():
                        print(f"  {name}: " + ", ".join(f"{a}={b}" for a, b in d.items()))
                else:
                    print(f"{k}: {v}")
    return 0


# ----------------------------------------------------------------------------------------------
# bench
# ----------------------------------------------------------------------------------------------


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
        raise argparse.ArgumentTypeError(
            f"{bad[0]!r} is not a positive integer (give a comma-separated list such as 60,120)"
        )
    return text


def _numpy_blas() -> str:
    """numpy's BLAS as its build configuration names it (``"?"`` if numpy cannot say)."""
    import numpy as np

    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    except (TypeError, KeyError):  # numpy < 1.26 has no mode="dicts"
        return "?"
    return f"{blas.get('name', '?')} {blas.get('version', '')}".strip()


def algos_from_args(args) -> tuple[str, ...]:
    """Validate what argparse cannot see alone (``--algo`` per benchmark, ``--device``)
    before any work; raises :class:`runtime.UsageError`. Returns the normalised ``--algo``
    names (empty: the benchmark's default)."""
    from .bench import ALGOS
    from .collectives import allreduce_name, allreduce_names

    kernel = args.kernel if args.what == "model" else args.what
    names: tuple[str, ...] = ()
    if args.algo is not None:
        if kernel not in ALGOS:
            raise runtime.UsageError(f"--algo does not apply to bench {args.what}")
        given = [a.strip().lower() for a in args.algo.split(",")]
        if kernel == "gemv":
            given = [allreduce_name(a) for a in given]
        unknown = [a for a in given if a not in ALGOS[kernel]]
        if unknown:
            known = allreduce_names() if kernel == "gemv" else ", ".join(ALGOS[kernel])
            raise runtime.UsageError(f"--algo {unknown[0]!r}: {kernel} algorithms are {known}")
        names = tuple(dict.fromkeys(given))
    from .plmr import get_device

    try:
        get_device(args.device)
    except ValueError as e:
        raise runtime.UsageError(f"--device {args.device}: {e}") from None
    return names


def add_bench_parser(sub) -> None:
    from . import bench

    p = sub.add_parser(
        "bench",
        help="benchmarks: emulator wall time and modeled wafer time",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=bench.__doc__,
    )
    p.add_argument(
        "what",
        choices=["fabric", "gemv", "gemm", "model", "calibrate"],
        help="fabric: shifts and allreduce vs raw MPI and numpy copies; gemv/gemm: a "
        "kernel vs numpy on the same matrices; model: modeled time vs mesh side "
        "(no emulation); calibrate: how the device constants were derived",
    )
    p.add_argument(
        "--mesh",
        default=None,
        metavar="PYxPX",
        help="virtual mesh (default: 512x512 for fabric, 128x128 gemv, 64x64 gemm)",
    )
    p.add_argument("--ranks", default=None, metavar="RYxRX", help="rank grid (default: squarest)")
    p.add_argument(
        "--algo",
        default=None,
        help="gemv: ktree|pipeline|ring (default ktree; meshgemv = ktree); gemm: "
        "meshgemm|cannon|summa; comma-separated lists allowed",
    )
    p.add_argument(
        "--size",
        type=_count(1),
        default=None,
        help="matrix size N (gemv: [1,N]x[N,N], gemm: NxNxN; default 8192 / 4096)",
    )
    p.add_argument(
        "--tile", type=_count(1), default=16, help="fabric: tile side per core (default 16)"
    )
    p.add_argument("--groups", type=_count(1), default=None, help="K-tree first-level group count")
    p.add_argument("--levels", type=_count(1), default=2, help="K-tree levels (default 2)")
    p.add_argument(
        "--device",
        default="wse2",
        help="device preset (wse2, wse3, or NAME:field=value,... overrides)",
    )
    p.add_argument(
        "--sides",
        type=_sizes,
        default="60,120,180,240,360,480,600,720",
        help="model: mesh sides to sweep",
    )
    p.add_argument(
        "--sizes",
        type=_sizes,
        default=None,
        help="model: matrix sizes (default gemm 2048,8192; gemv 2048,8192,16384,32768)",
    )
    p.add_argument("--kernel", choices=["gemm", "gemv"], default="gemv", help="model: which kernel")
    p.add_argument("--check", action="store_true", help="compare with numpy, print the max error")
    p.add_argument(
        "--emulation",
        choices=emulations(),
        default=DEFAULT_EMULATION,
        help=f"how kernels move tiles (default {DEFAULT_EMULATION}): exact, every core its own "
        "steps; aggregated, tiles by identity and whole GEMMs per rank (meshrt.movers)",
    )
    p.add_argument("--repeat", type=_count(1), default=5, help="timed runs (median reported)")
    p.add_argument("--warmup", type=_count(0), default=1, help="untimed runs first")
    p.add_argument(
        "--json", metavar="FILE", default=None, help="write results as JSON ('-' = stdout)"
    )
    p.add_argument("--csv", metavar="FILE", default=None, help="write results as CSV")
    p.add_argument("--plot", metavar="PNG", default=None, help="model: plot (needs matplotlib)")


def run_bench(args) -> int:
    """``bench``: check the options, run one benchmark, print its rows and write the files."""
    from . import bench

    algos = algos_from_args(args)
    comm = runtime.world()
    rank, size = runtime.rank_and_size(comm)
    log = runtime.setup_logging(comm)
    if args.what == "calibrate":
        from .calibrate import report
        from .plmr import get_device

        if rank == 0:
            print(report(get_device(args.device)))
            print(
                "  (the full fit, with the decode and KV-capacity points: "
                "python -m llm estimate --calibration)"
            )
        return 0
    spec = bench.BenchSpec(
        repeat=args.repeat,
        warmup=args.warmup,
        device=args.device,
        algos=algos,
        size=args.size,
        tile=args.tile,
        groups=args.groups,
        levels=args.levels,
        check=args.check,
        emulation=args.emulation,
    )
    if args.what == "model":
        rows = bench.bench_model(
            args.kernel, _ints(args.sides), _ints(args.sizes), spec, args.plot, comm
        )
    else:
        layout = layout_from_args(args.mesh or bench.DEFAULT_MESH[args.what], args.ranks, size)
        run = {"fabric": bench.bench_fabric, "gemv": bench.bench_gemv, "gemm": bench.bench_gemm}[
            args.what
        ]
        rows = run(layout, spec, comm, log)
    if rank == 0:
        for r in rows:
            print(
                "  ".join(
                    f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in r.items()
                    if v is not None
                )
            )
    emit(rows, args, rank)
    return 0


def _ints(text: str | None) -> tuple:
    """``"60,120"`` (checked by argparse) -> ``(60, 120)``; ``None`` -> ``()``."""
    return () if text is None else tuple(int(s) for s in text.split(","))


def emit(rows: list[dict], args, rank: int) -> None:
    """Rank 0 writes ``--json`` (``-``: stdout) and ``--csv``."""
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


def main(argv=None) -> int:
    """Console entry point (``meshrt`` / ``python -m meshrt``)."""

    def _main(argv):
        args = build_parser().parse_args(argv)
        if args.command == "info":
            return info(args)
        return run_bench(args)

    return runtime.run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
