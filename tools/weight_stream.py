"""The weight-stream floor of a decode step on this machine: how long the ranks take to read
their share of a model's float32 weights once, as GEMVs.

A decode step must read every weight once (batch 1), so no emulator or framework can take less
per token than this on the same cores. Run it under ``mpiexec -n R`` with the total weight bytes;
each rank multiplies its ``1/R`` share, a ``[rows, width]`` float32 matrix, by a vector, the
ranks start together, and the slowest rank's median over ``--repeat`` passes is printed::

    mpiexec -n 2 python tools/weight_stream.py --mib 513 --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--mib", type=float, required=True, help="float32 weight MiB of the model")
    ap.add_argument("--width", type=int, default=576, help="GEMV input width (default 576)")
    ap.add_argument("--repeat", type=int, default=15, help="timed passes (median reported)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)

    import numpy as np
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rows = max(1, int(args.mib * 2**20 / 4 / comm.size / args.width))
    w = np.random.default_rng(comm.rank).random((rows, args.width), dtype=np.float32)
    x = np.ones(args.width, np.float32)
    times = []
    for _ in range(args.repeat + 1):  # the first pass warms the pages up
        comm.Barrier()
        t0 = time.perf_counter()
        w @ x
        times.append(time.perf_counter() - t0)
    median = comm.allreduce(statistics.median(times[1:]), op=MPI.MAX)
    if comm.rank == 0:
        rec = {
            "ranks": comm.size,
            "mib": args.mib,
            "seconds": median,
            "gb_per_s": args.mib * 2**20 / median / 1e9,
        }
        print(
            json.dumps(rec)
            if args.json
            else f"{args.mib:.0f} MiB of float32 weights on {comm.size} ranks: "
            f"{median * 1e3:.1f} ms per pass ({rec['gb_per_s']:.1f} GB/s in all)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
