"""Running the command line as a user would, in a subprocess: the paths and environment shared
by the CLI tests of every room (``mpiexec`` from the venv, Open MPI as root, one BLAS thread)."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
MPIEXEC = os.environ.get("MPIEXEC", os.path.join(BIN, "mpiexec"))
ENV = dict(
    os.environ,
    OMPI_ALLOW_RUN_AS_ROOT="1",
    OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
    PRTE_MCA_rmaps_default_mapping_policy=":oversubscribe",
    OMPI_MCA_pml="ob1",
    OMPI_MCA_btl="self,sm",
    OPENBLAS_NUM_THREADS="1",
    PYTHONUNBUFFERED="1",
)

needs_mpiexec = pytest.mark.skipif(not os.path.exists(MPIEXEC), reason="no mpiexec in the venv")
