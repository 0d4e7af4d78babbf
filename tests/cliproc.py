"""Running the command line as a user would, in a subprocess: the paths and environment shared
by the CLI tests of every room (``mpiexec`` from the venv, Open MPI as root, one BLAS thread)."""

import os
import sys

import pytest

from meshrt.runtime import LOCAL_MPI_ENV

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
MPIEXEC = os.environ.get("MPIEXEC", os.path.join(BIN, "mpiexec"))
ENV = dict(os.environ, **LOCAL_MPI_ENV, PYTHONUNBUFFERED="1")

needs_mpiexec = pytest.mark.skipif(not os.path.exists(MPIEXEC), reason="no mpiexec in the venv")
