"""Running one fault case as a user would: a whole process (or mpiexec job) with a timeout.

Each case checks the exit code, the one ``error:`` line, the wall time (no hang), and that no
file outside the intended output changed (:func:`snapshot` before and after).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meshrt.runtime import LOCAL_MPI_ENV

ROOT = Path(__file__).resolve().parents[1]
BIN = os.path.dirname(sys.executable)
MPIEXEC = os.environ.get("MPIEXEC", os.path.join(BIN, "mpiexec"))
LAUNCHER_VARS = (
    "OMPI_COMM_WORLD_SIZE",
    "OMPI_COMM_WORLD_RANK",
    "PMI_SIZE",
    "PMI_RANK",
    "PMIX_RANK",
    "MPI_LOCALNRANKS",
    "SLURM_STEP_NUM_TASKS",
    "SLURM_NTASKS",
    "SLURM_STEP_ID",
    "SLURM_PROCID",
    "MESHRT_FORCE_MPI",
)
ENV = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
ENV.update(
    LOCAL_MPI_ENV,
    PYTHONUNBUFFERED="1",
    MESHRT_ERROR_WAIT="3",
)
#: A job script that runs ``python -m llm`` with each rank in its own working directory, as on
#: nodes without a shared filesystem: ``script DIR_0 .. DIR_{n-1} LLM_ARGS...``.
PER_RANK_CWD = """
import os, runpy, sys
rank = int(os.environ["OMPI_COMM_WORLD_RANK"])
os.chdir(sys.argv[1 + rank])
sys.argv = ["llm"] + sys.argv[1 + int(os.environ["OMPI_COMM_WORLD_SIZE"]):]
runpy.run_module("llm", run_name="__main__", alter_sys=True)
"""
needs_mpiexec = pytest.mark.skipif(not os.path.exists(MPIEXEC), reason="no mpiexec in the venv")


def run(args, n=None, env=None, timeout=60, module="llm", safe=True, preexec_fn=None, stdout=None):
    """Run ``python -m MODULE ARGS`` (under ``mpiexec -n n`` if given); (process, seconds).

    ``safe`` adds ``-m mpi4py`` under mpiexec (the documented launch form).
    """
    py = [sys.executable] + (["-m", "mpi4py"] if n and safe else [])
    cmd = (
        ([MPIEXEC, "-n", str(n)] if n else [])
        + py
        + (["-m", module] if module else [])
        + [str(a) for a in args]
    )
    t0 = time.monotonic()
    p = subprocess.run(
        cmd,
        cwd=ROOT,
        env={**ENV, **(env or {})},
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        preexec_fn=preexec_fn,
        stdout=stdout or subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    return p, time.monotonic() - t0


def error_lines(text: str) -> list[str]:
    """``error:`` lines of a run's stderr (also ``rank r/N: error:`` ones)."""
    lines = [line.lstrip("\0 ") for line in text.splitlines()]  # mpiexec may insert NULs
    return [
        line
        for line in lines
        if line.startswith("error:") or (line.startswith("rank ") and ": error:" in line)
    ]


def assert_one_error(p, dt, *phrases, code=2, within=30.0):
    """Exit ``code``, exactly one ``error:`` line holding every phrase, no traceback, and the
    whole run ended within ``within`` seconds."""
    assert p.returncode == code, f"exit {p.returncode}\n{p.stdout}\n{p.stderr}"
    errors = error_lines(p.stderr)
    assert len(errors) == 1, p.stderr
    for phrase in phrases:
        assert phrase in errors[0], errors[0]
    assert "Traceback" not in p.stderr, p.stderr
    assert dt < within, f"took {dt:.1f} s"
    return errors[0]


def snapshot(*roots) -> dict:
    """``path -> (size, mtime, sha256)`` of every file and directory under ``roots``."""
    out = {}
    for root in roots:
        root = Path(root)
        for path in [root, *root.rglob("*")] if root.exists() else []:
            if path.is_symlink() or path.is_dir():
                out[str(path)] = ("dir" if path.is_dir() else "link",)
                continue
            data = path.read_bytes()
            out[str(path)] = (len(data), path.stat().st_mtime_ns, hashlib.sha256(data).hexdigest())
    return out


def changed(before: dict, after: dict, allowed=()) -> list[str]:
    """Paths that appeared, vanished or changed, other than under ``allowed`` paths."""
    allowed = [str(a) for a in allowed]
    diff = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    return [k for k in diff if not any(k == a or k.startswith(a + os.sep) for a in allowed)]
