"""A directory that every rank of an MPI test run sees."""

import os
import shutil
import uuid
from pathlib import Path

import pytest

#: Set when the ranks' temporary directories are not shared (hosts each with their own /tmp):
#: a directory on a filesystem every rank sees.
SHARED_DIR_ENV = "WAFERLLM_TEST_SHARED_DIR"


@pytest.fixture
def shared_tmp_path(request):
    """A fresh directory that every rank sees, the same path on each, for tests of shard sets
    on a shared filesystem: under ``$WAFERLLM_TEST_SHARED_DIR`` if set, else pytest-mpi's
    ``mpi_tmp_path`` (rank 0's temporary directory, which every rank sees only when all run
    on one host)."""
    root = os.environ.get(SHARED_DIR_ENV)
    if not root:
        yield request.getfixturevalue("mpi_tmp_path")
        return
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    name = comm.bcast(f"{request.node.name[:40]}-{uuid.uuid4().hex[:8]}", root=0)
    path = Path(root) / "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    if comm.Get_rank() == 0:
        path.mkdir(parents=True)
    comm.Barrier()
    yield path
    comm.Barrier()
    if comm.Get_rank() == 0:
        shutil.rmtree(path, ignore_errors=True)
