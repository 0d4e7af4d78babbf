"""Process-level plumbing: MPI start-up, the control plane, rank-0 logging, and ending the whole
job on any error.

Nothing here carries algorithm data; it is all control plane. :class:`ControlPlane` is the one
object through which code outside ``meshrt`` talks to the other ranks (broadcasts, gathers,
agreement on errors); the data plane is :class:`meshrt.fabric.Fabric`.
"""

from __future__ import annotations

import logging
import os
import pickle
import sys
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from .mesh import grid_coords

if TYPE_CHECKING:
    from mpi4py.MPI import Intracomm as Comm  # COMM_WORLD and the communicators made from it
else:
    Comm = Any  # mpi4py.MPI.Comm; mpi4py is imported only when a launcher started the job

T = TypeVar("T")

#: What Open MPI from PyPI needs to start a job on one machine as root with more ranks than
#: cores, over shared memory, with one BLAS thread per rank: the Makefile and
#: ``jobs/mpirun.sh`` export the same; tests and tools add it to a child's environment.
LOCAL_MPI_ENV = {
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe",
    "OMPI_MCA_rmaps_base_oversubscribe": "true",
    "OMPI_MCA_pml": "ob1",
    "OMPI_MCA_btl": "self,sm",
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
}

# Ranks share cores; BLAS threads per rank would oversubscribe them (set before numpy loads).
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")


def world():
    """``COMM_WORLD`` when running under an MPI launcher, else ``None`` (one process, no MPI).

    Raises :class:`LaunchError` when the launcher started several tasks but MPI sees this
    process alone (see :func:`check_singleton`).
    """
    if not launched_by_mpi():
        check_singleton(1, os.environ)
        return None
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    check_singleton(comm.Get_size(), os.environ)
    return comm


def launched_by_mpi() -> bool:
    """Whether an MPI launcher (mpiexec, srun) started this process."""
    keys = (
        "OMPI_COMM_WORLD_SIZE",
        "PMI_SIZE",
        "PMIX_RANK",
        "PMI_RANK",
        "MPI_LOCALNRANKS",
        "SLURM_STEP_NUM_TASKS",
    )
    return any(k in os.environ for k in keys) or os.environ.get("MESHRT_FORCE_MPI") == "1"


# What each launcher says about the job, most specific first: (variable, launcher, what to fix).
_SRUN_FIX = (
    "launch with srun --mpi=pmix (srun --mpi=list shows the plugins; the MPI that "
    "mpi4py loads needs PMIx)"
)
_MPIEXEC_FIX = (
    "use the mpiexec of the MPI library mpi4py loads (python -m mpi4py "
    "--mpi-library shows it), and check that mpiexec did not fail during start-up"
)
_TASK_COUNTS = (
    ("OMPI_COMM_WORLD_SIZE", "mpiexec", _MPIEXEC_FIX),
    ("PMI_SIZE", "the launcher", "under Slurm " + _SRUN_FIX + "; with mpiexec, " + _MPIEXEC_FIX),
    ("SLURM_STEP_NUM_TASKS", "srun", _SRUN_FIX),
)
_TASK_RANKS = ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID")


def check_singleton(mpi_size: int, environ) -> None:
    """Raise :class:`LaunchError` if the launcher started N > 1 tasks but MPI says 1.

    That happens when ``srun`` starts the tasks without a PMI plugin the MPI library speaks
    (``--mpi=none``/``pmi2`` with Open MPI 5), or when ``mpiexec`` failed during start-up: every
    task then believes it is rank 0 of 1 and would run the whole job alone. The launcher's own
    variables (``OMPI_COMM_WORLD_SIZE``, ``PMI_SIZE``, ``SLURM_STEP_NUM_TASKS``; ``SLURM_NTASKS``
    inside a step) give the task count; the most specific one present is trusted. A task rank
    above 0 (``PMIX_RANK``, ``SLURM_PROCID``, ...) while MPI says 1 rank is the same fault.
    """
    if mpi_size != 1:
        return
    counts = list(_TASK_COUNTS)
    if "SLURM_STEP_ID" in environ and "SLURM_STEP_NUM_TASKS" not in environ:
        counts.append(("SLURM_NTASKS", "srun", _SRUN_FIX))
    for var, launcher, fix in counts:
        value = _int_env(environ, var)
        if value is None:
            continue
        if value > 1:
            raise LaunchError(
                f"{launcher} started {value} tasks ({var}={value}) but MPI sees "
                "this process alone (rank 0 of 1), so each task would run the "
                f"whole job by itself: {fix}"
            )
        break
    for var in _TASK_RANKS:
        value = _int_env(environ, var)
        if value:
            fix = _SRUN_FIX if var.startswith("SLURM") else _MPIEXEC_FIX
            raise LaunchError(
                f"this is task {value} of a parallel launch ({var}={value}) but "
                f"MPI sees it alone (rank 0 of 1): {fix}"
            )


def _int_env(environ, var: str) -> int | None:
    try:
        return int(str(environ[var]).strip().split("(")[0])
    except (KeyError, ValueError):
        return None


def rank_and_size(comm) -> tuple[int, int]:
    """``(rank, size)`` of a communicator, a :class:`ControlPlane`, or ``None`` (one process)."""
    if isinstance(comm, ControlPlane):
        return comm.rank, comm.size
    return (0, 1) if comm is None else (comm.Get_rank(), comm.Get_size())


# ----------------------------------------------------------------------------------------------
# the control plane
# ----------------------------------------------------------------------------------------------

_OPS = ("sum", "max", "min")


class ControlPlane:
    """The ranks of a job as seen by the host program: who am I, tell everyone, agree on errors.

    It wraps an mpi4py communicator, or nothing: ``ControlPlane(None)`` (:meth:`single`) is one
    process, size 1, and every method is a local operation without MPI. All methods are
    collective over the communicator (every rank calls them in the same order) and move small
    pickled Python objects; bulk tensor data goes through :class:`meshrt.fabric.Fabric`.

    Parameters
    ----------
    comm : mpi4py.MPI.Comm or None
        The communicator; ``None`` means one process.
    """

    def __init__(self, comm: Comm | None = None):
        if isinstance(comm, ControlPlane):
            raise TypeError(
                "ControlPlane(comm) wraps a communicator; use ControlPlane.of(x) to accept either"
            )
        self.comm = comm
        self._rank, self._size = (0, 1) if comm is None else (comm.Get_rank(), comm.Get_size())

    @classmethod
    def single(cls) -> ControlPlane:
        """One process, no MPI."""
        return cls(None)

    @classmethod
    def world(cls) -> ControlPlane:
        """``COMM_WORLD`` under an MPI launcher, else one process (see :func:`world`)."""
        return cls(world())

    @classmethod
    def of(cls, control: ControlPlane | Comm | None) -> ControlPlane:
        """``control`` itself if it is a ControlPlane, else the ControlPlane of that
        communicator (``None``: one process). For the edges of a program, where a raw
        communicator arrives."""
        return control if isinstance(control, ControlPlane) else cls(control)

    def __repr__(self) -> str:
        return f"ControlPlane(rank {self._rank} of {self._size})"

    # -- who am I --------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        """This process's rank, ``0 .. size-1``."""
        return self._rank

    @property
    def size(self) -> int:
        """Number of processes."""
        return self._size

    @property
    def communicator(self) -> Comm:
        """The MPI communicator of a plane of several ranks (one process has none)."""
        if self.comm is None:
            raise RuntimeError("a one-process control plane has no communicator")
        return self.comm

    @property
    def is_root(self) -> bool:
        """Whether this is rank 0, the rank that reads inputs and writes output."""
        return self._rank == 0

    def coords(self, grid: tuple[int, int]) -> tuple[int, int]:
        """This rank's position ``(ry, rx)`` in a row-major ``Ry x Rx`` process grid.

        Raises :class:`~meshrt.mesh.MeshError` if the grid does not hold ``size`` ranks.
        """
        from .mesh import MeshError

        if int(grid[0]) * int(grid[1]) != self._size:
            raise MeshError(
                f"rank grid {grid[0]}x{grid[1]} needs {int(grid[0]) * int(grid[1])} "
                f"ranks but {self._size} are running"
            )
        return grid_coords(self._rank, grid)

    # -- collectives on Python objects -----------------------------------------------------
    def bcast(self, value: T, root: int = 0) -> T:
        """``root``'s ``value`` on every rank."""
        return value if self._size == 1 else self.communicator.bcast(value, root=root)

    def bcast_idle(self, value: T, root: int = 0, max_sleep: float = 0.05) -> T:
        """:meth:`bcast` for a value the root may take long to have, such as a line a person
        types: the other ranks wait asleep instead of spinning in the broadcast.

        Every rank enters a non-blocking barrier and tests it with sleeps that double from
        0.2 ms to ``max_sleep`` seconds; once the root arrives, the value is broadcast. A
        waiting rank then uses a few milliseconds of CPU per second, and the value arrives at
        most ``max_sleep`` late: for waits on people, never on the mesh's own steps.
        """
        if self._size == 1:
            return value
        sleep_until(self.communicator.Ibarrier(), max_sleep)
        return self.communicator.bcast(value, root=root)

    def gather(self, value: T, root: int = 0) -> list[T] | None:
        """Every rank's ``value`` in rank order on ``root``; ``None`` on the other ranks."""
        return [value] if self._size == 1 else self.communicator.gather(value, root=root)

    def allgather(self, value: T) -> list[T]:
        """Every rank's ``value`` in rank order, on every rank."""
        return [value] if self._size == 1 else self.communicator.allgather(value)

    def allreduce(self, value: T, op: str = "sum") -> T:
        """``value`` reduced over all ranks with ``op`` (``"sum"``, ``"max"`` or ``"min"``),
        on every rank."""
        if op not in _OPS:
            raise ValueError(f"allreduce op {op!r}: use one of {', '.join(_OPS)}")
        if self._size == 1:
            return value
        from mpi4py import MPI

        return self.communicator.allreduce(
            value, op={"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}[op]
        )

    def allreduce_max(self, value: T) -> T:
        """The largest ``value`` of all ranks, on every rank (e.g. the slowest rank's time)."""
        return self.allreduce(value, op="max")

    def barrier(self) -> None:
        """Wait until every rank arrives."""
        if self._size > 1:
            self.communicator.Barrier()

    # -- agreement on errors ---------------------------------------------------------------
    def agree(
        self,
        fn: Callable[[], T],
        *,
        on: str = "root",
        catch: type[BaseException] | tuple[type[BaseException], ...] = (Exception, SystemExit),
    ) -> T:
        """Run the check ``fn()`` on one rank or on all, and fail on every rank alike.

        A check that raises on some ranks only would leave the others blocked in their next
        collective. ``agree`` makes the outcome common: either every rank returns, or every
        rank raises an exception of the same type with the same message.

        Parameters
        ----------
        fn : callable
            The check, called without arguments (bind them with ``lambda`` or ``partial``).
        on : {"root", "all"}
            ``"root"``: only rank 0 runs ``fn`` (it reads a file, asks the user) and its result
            is broadcast. ``"all"``: every rank runs ``fn`` (each checks its own file); when it
            fails on some ranks, the exception of the lowest failing rank is raised everywhere,
            its message prefixed ``"on rank R: "`` unless every rank failed.
        catch : exception type or tuple
            What ``fn`` may raise to be agreed on (default: ``Exception`` and ``SystemExit``,
            which includes :class:`UsageError`). Anything else propagates on the raising rank
            alone, as a crash does (:func:`run_main` then ends the job).

        Returns
        -------
        object
            ``on="root"``: rank 0's value, on every rank. ``on="all"``: this rank's own value.
        """
        if on not in ("root", "all"):
            raise ValueError(f"agree(on={on!r}): use 'root' or 'all'")
        if self._size == 1:
            return fn()
        if on == "root":
            outcome: tuple[str, Any] | None = None
            if self.is_root:
                try:
                    outcome = ("ok", fn())
                except catch as e:
                    outcome = ("error", _portable(e))
                    own = e
            status, payload = self.communicator.bcast(outcome, root=0)
            if status == "ok":
                return payload
            if self.is_root:
                raise own
            raise payload
        value: Any = None
        mine: BaseException | None = None
        try:
            value = fn()
        except catch as e:
            mine = e
        failures = self.communicator.allgather(None if mine is None else _portable(mine))
        failed = [(r, e) for r, e in enumerate(failures) if e is not None]
        if not failed:
            return value
        first, error = failed[0]
        if len(failed) < self._size:
            error = _with_prefix(error, f"on rank {first}: ")
        elif first == self._rank and mine is not None:
            raise mine
        raise error from mine


def sleep_until(request, max_sleep: float = 0.05) -> None:
    """Wait for an MPI ``request`` by testing it with sleeps growing from 0.2 ms to
    ``max_sleep`` seconds (a waiting rank sleeps instead of polling a core)."""
    import time

    pause = 0.0002
    while not request.Test():
        time.sleep(pause)
        pause = min(2 * pause, max_sleep)


def _portable(e: BaseException) -> BaseException:
    """``e`` if it survives pickling (to be sent to other ranks), else a ``RuntimeError``
    carrying its type name and message."""
    try:
        copy = pickle.loads(pickle.dumps(e))
        if type(copy) is type(e) and str(copy) == str(e):
            return e
    except Exception:  # noqa: BLE001 - any failure to round-trip means: send a plain copy
        pass
    return RuntimeError(f"{type(e).__name__}: {e}")


def _with_prefix(e: BaseException, prefix: str) -> BaseException:
    """A copy of ``e`` whose message starts with ``prefix`` (``e`` itself if its arguments are
    not a single message)."""
    if len(e.args) == 1 and isinstance(e.args[0], str):
        try:
            return type(e)(prefix + e.args[0])
        except Exception:  # noqa: BLE001 - a constructor of another shape: keep the original
            pass
    return e


class _RankFilter(logging.Filter):
    def __init__(self, rank: int, size: int, all_ranks: bool):
        super().__init__()
        self.rank, self.size, self.all_ranks = rank, size, all_ranks

    def filter(self, record):
        record.rankinfo = f"[{self.rank}/{self.size}] " if self.size > 1 else ""
        return self.all_ranks or self.rank == 0 or record.levelno >= logging.WARNING


def setup_logging(
    comm=None, level: str | int = "INFO", all_ranks: bool | None = None, name: str = "meshrt"
) -> logging.Logger:
    """A logger that prints on rank 0 only (all ranks for warnings, or with
    ``MESHRT_LOG_ALL_RANKS=1``), each line prefixed ``[rank/size]`` under MPI.

    ``comm`` is a :class:`ControlPlane`, a communicator, or ``None`` (one process)."""
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

    A :class:`UsageError` (bad input) normally arises on every rank alike: the ranks agree on
    it over a private communicator (a non-blocking barrier), rank 0 prints the one ``error:``
    line and every rank returns 2. If some ranks do not arrive within ``MESHRT_ERROR_WAIT``
    seconds (default 10), the error was seen by only some ranks while the others are busy or
    blocked: the rank prints its message itself and aborts the job, so nothing hangs and the
    message is not lost. A closed stdout (``llm info | head``) ends quietly with code 141.
    """
    comm, rank, size, agree = None, 0, 1, None
    try:
        comm = world()
        rank, size = rank_and_size(comm)
        if size > 1:
            agree = comm.Dup()  # exit agreement, never mixed with the job's own collectives
        rc = main(argv)
        return 0 if rc is None else int(rc)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
        message = None if e.code in (None, 0) or isinstance(e.code, int) else str(e.code)
        collective = getattr(e, "collective", False)
        if size > 1 and code and collective:
            collective = _all_ranks_arrive(agree, _error_wait())
        if message is not None and (rank == 0 or not collective):
            prefix = f"rank {rank}/{size}: " if size > 1 and not collective else ""
            print(f"{prefix}error: {message}", file=sys.stderr, flush=True)
        if code and size > 1 and not collective:
            assert comm is not None  # size > 1: under a launcher
            comm.Abort(code)
        if code:
            _finalize()  # every rank agreed: end MPI cleanly (no abort under -m mpi4py)
        return code
    except KeyboardInterrupt:
        if size > 1:
            assert comm is not None  # size > 1: under a launcher
            comm.Abort(130)
        return 130
    except BrokenPipeError:
        _quiet_stdout()
        return 141
    except BaseException:
        prefix = f"rank {rank}/{size}: " if size > 1 else ""
        sys.stderr.write(f"{prefix}unhandled exception, ending the job\n{traceback.format_exc()}")
        sys.stderr.flush()
        if size > 1:
            assert comm is not None  # size > 1: under a launcher
            comm.Abort(1)
        return 1


def _finalize() -> None:
    MPI = sys.modules.get("mpi4py.MPI")
    if MPI is not None and MPI.Is_initialized() and not MPI.Is_finalized():
        MPI.Finalize()


def _error_wait() -> float:
    try:
        return float(os.environ.get("MESHRT_ERROR_WAIT", "10"))
    except ValueError:
        return 10.0


def _all_ranks_arrive(comm, timeout: float) -> bool:
    """Whether every rank of ``comm`` enters a barrier within ``timeout`` seconds."""
    import time

    if comm is None:
        return False
    request = comm.Ibarrier()
    deadline = time.monotonic() + timeout
    while not request.Test():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def _quiet_stdout() -> None:
    """After the reader of stdout went away: send what is left to /dev/null (no second
    BrokenPipeError when the interpreter flushes stdout at exit)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


class UsageError(SystemExit):
    """Bad input detected identically on every rank: print once on rank 0, exit 2, no Abort.

    Raised on only some ranks, it still ends the job with its message (see :func:`run_main`).
    """

    collective = True

    def __init__(self, message: str):
        super().__init__(message)


class LaunchError(UsageError):
    """The launcher started several tasks but MPI sees one (each would run alone)."""
