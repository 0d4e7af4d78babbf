"""One rank of a job that ``jobs/mpirun.sh`` or ``jobs/slurm.sbatch`` starts.

``python jobs/rank.py -m llm ARGS`` is ``python -m mpi4py -m llm ARGS`` that also writes
``waferllm-rank-end RANK HOST`` on stderr when the program reaches its end, before MPI finalizes
(which waits for every rank). The launch script takes these lines out of the job's output and,
when a launch runs out of time, names the ranks that never got there and their hosts.
"""

import atexit
import os
import runpy
import socket
import sys


def _rank() -> str:
    for var in ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID"):
        if os.environ.get(var):
            return os.environ[var]
    return "?"


def _reached_the_end() -> None:
    sys.stderr.write(f"\nwaferllm-rank-end {_rank()} {socket.gethostname()}\n")
    sys.stderr.flush()


if __name__ == "__main__":
    sys.path[0] = os.getcwd()  # as for `python -m`: modules of the current directory, not of jobs/
    atexit.register(_reached_the_end)  # runs before mpi4py's MPI_Finalize (a C-level exit hook)
    runpy.run_module("mpi4py", run_name="__main__", alter_sys=True)
