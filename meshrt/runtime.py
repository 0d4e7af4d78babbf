"""Process-level plumbing: MPI start-up, rank-0 logging, and ending the whole job on any error.

Nothing here carries algorithm data; it is all control plane.
"""
from __future__ import annotations

import logging
import os
import sys
import traceback

# Ranks share cores; BLAS threads per rank would oversubscribe them (set before numpy loads).
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")


def world():
    """``COMM_WORLD`` when running under an MPI launcher, else ``None`` (one process, no MPI)."""
    if not launched_by_mpi():
        return None
    from mpi4py import MPI
    return MPI.COMM_WORLD


def launched_by_mpi() -> bool:
    """Whether an MPI launcher (mpiexec, srun) started this process."""
    keys = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "PMI_RANK", "MPI_LOCALNRANKS",
            "SLURM_STEP_NUM_TASKS")
    return any(k in os.environ for k in keys) or os.environ.get("MESHRT_FORCE_MPI") == "1"


def rank_and_size(comm) -> tuple[int, int]:
    return (0, 1) if comm is None else (comm.Get_rank(), comm.Get_size())


class _RankFilter(logging.Filter):
    def __init__(self, rank: int, size: int, all_ranks: bool):
        super().__init__()
        self.rank, self.size, self.all_ranks = rank, size, all_ranks

    def filter(self, record):
        record.rankinfo = f"[{self.rank}/{self.size}] " if self.size > 1 else ""
        return self.all_ranks or self.rank == 0 or record.levelno >= logging.WARNING


def setup_logging(comm=None, level: str | int = "INFO", all_ranks: bool | None = None,
                  name: str = "meshrt") -> logging.Logger:
    """A logger that prints on rank 0 only (all ranks for warnings, or with
    ``MESHRT_LOG_ALL_RANKS=1``), each line prefixed ``[rank/size]`` under MPI."""
    rank, size = rank_and_size(comm)
    if all_ranks is None:
        all_ranks = os.environ.get("MESHRT_LOG_ALL_RANKS", "0") == "1"
    log = logging.getLogger(name)
    log.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RankFilter(rank, size, all_ranks))
    handler.setFormatter(logging.Formatter("%(rankinfo)s%(message)s"))
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False
    return log


def run_main(main, argv=None) -> int:
    """Run ``main(argv)`` so that an exception on any rank ends the whole job promptly.

    On one process the exception is printed and the exit code is 1 (``SystemExit`` codes are
    kept, Ctrl-C gives 130). Under MPI the failing rank prints ``rank r/N`` and its traceback,
    then calls ``Abort`` so that ranks blocked in communication do not hang.
    """
    comm = world()
    rank, size = rank_and_size(comm)
    try:
        rc = main(argv)
        return 0 if rc is None else int(rc)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
        if e.code not in (None, 0) and not isinstance(e.code, int):
            # a message for the user: print it once (on rank 0) or from the rank that raised it
            if rank == 0 or not getattr(e, "collective", False):
                print(f"error: {e.code}", file=sys.stderr, flush=True)
        if code and size > 1 and not getattr(e, "collective", False):
            comm.Abort(code)
        return code
    except KeyboardInterrupt:
        if size > 1:
            comm.Abort(130)
        return 130
    except BaseException:
        prefix = f"rank {rank}/{size}: " if size > 1 else ""
        sys.stderr.write(f"{prefix}unhandled exception, ending the job\n{traceback.format_exc()}")
        sys.stderr.flush()
        if size > 1:
            comm.Abort(1)
        return 1


class UsageError(SystemExit):
    """Bad input detected identically on every rank: print once on rank 0, exit 2, no Abort."""

    collective = True

    def __init__(self, message: str):
        super().__init__(message)
