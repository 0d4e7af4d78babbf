"""``python -m meshrt {info,bench}``: the mesh runtime's command line.

Runs the same with one process and under ``mpiexec -n N`` / ``srun``.
"""
from __future__ import annotations

import argparse
import json
import sys

from . import runtime  # noqa: F401  (sets BLAS threads before numpy loads)


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
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{info,bench}")

    info = sub.add_parser("info", help="versions, the rank grid and virtual mesh, device presets")
    add_mesh_args(info)
    info.add_argument("--json", action="store_true", help="print JSON instead of text")

    from .bench import add_bench_parser
    add_bench_parser(sub)
    return p


def add_mesh_args(p: argparse.ArgumentParser, default_mesh: str | None = None) -> None:
    """``--mesh PYxPX`` and ``--ranks RYxRX`` as every mesh command takes them."""
    p.add_argument("--mesh", default=default_mesh, metavar="PYxPX",
                   help="virtual mesh of wafer cores, e.g. 64x64 (default: one core per rank)")
    p.add_argument("--ranks", default=None, metavar="RYxRX",
                   help="MPI rank grid; must multiply to the number of ranks running and divide "
                        "the virtual mesh (default: the squarest grid that fits)")


def layout_from_args(args, nranks: int):
    """The validated :class:`MeshLayout` named by ``--mesh``/``--ranks`` (``UsageError`` if bad)."""
    from .mesh import MeshError, MeshLayout, default_rank_grid, parse_grid
    try:
        if args.mesh is not None:
            return MeshLayout.parse(args.mesh, args.ranks, nranks)
        if args.ranks is None:
            ry, rx = default_rank_grid(nranks)
        else:
            ry, rx = parse_grid(args.ranks, "rank grid")
            if ry * rx != nranks:
                raise MeshError(f"rank grid {ry}x{rx} needs {ry * rx} ranks but {nranks} are running")
        return MeshLayout(ry, rx, ry, rx)
    except MeshError as e:
        raise runtime.UsageError(str(e)) from None


def info(args) -> int:
    import h5py
    import numpy as np

    from .plmr import PRESETS
    comm = runtime.world()
    rank, size = runtime.rank_and_size(comm)
    layout = layout_from_args(args, size)
    out = {"python": sys.version.split()[0], "numpy": np.__version__, "h5py": h5py.__version__,
           "h5py_mpi": bool(h5py.get_config().mpi), "ranks": size,
           "rank_grid": f"{layout.ry}x{layout.rx}", "virtual_mesh": f"{layout.py}x{layout.px}",
           "cores_per_rank": f"{layout.by}x{layout.bx}"}
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
        out["blas"] = [f"{d.get('internal_api')} {d.get('version')} threads={d.get('num_threads')}"
                       for d in threadpool_info()]
    except ImportError:
        cfg = np.show_config(mode="dicts") if hasattr(np, "show_config") else {}
        blas = (cfg or {}).get("Build Dependencies", {}).get("blas", {})
        out["blas"] = f"{blas.get('name', '?')} {blas.get('version', '')}".strip()
    out["devices"] = {k: {"cores": f"{d.cores_y}x{d.cores_x}", "mem_per_core_kib": d.mem_per_core / 1024,
                          "clock_ghz": d.clock_hz / 1e9, "alpha": d.alpha, "beta": d.beta,
                          "macs_per_cycle": d.macs_per_cycle, "routing_paths": d.routing_paths}
                      for k, d in PRESETS.items()}
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


def main(argv=None) -> int:
    def _main(argv):
        args = build_parser().parse_args(argv)
        if args.command == "info":
            return info(args)
        from .bench import run_bench
        return run_bench(args)
    return runtime.run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
