"""Test set-up shared by the serial and the MPI runs.

Under ``mpiexec`` a failing test on one rank would leave the others blocked in communication, so
any failure aborts the whole job (after its report is printed). Each rank gets its own basetemp.
"""

import os
import sys

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import pytest  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))


def _world_size():
    if "OMPI_COMM_WORLD_SIZE" in os.environ or "PMI_SIZE" in os.environ:
        from mpi4py import MPI

        return MPI.COMM_WORLD
    return None


def pytest_configure(config):
    comm = _world_size()
    if comm is not None and comm.Get_size() > 1 and not config.option.basetemp:
        import tempfile

        root = os.environ.get("MESHRT_TEST_TMP", tempfile.gettempdir())
        config.option.basetemp = os.path.join(
            root, f"pytest-meshrt-{os.getppid()}-rank{comm.Get_rank()}"
        )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed and call.when in ("setup", "call"):
        comm = _world_size()
        if comm is not None and comm.Get_size() > 1:
            sys.stderr.write(
                f"\nrank {comm.Get_rank()}: {item.nodeid} failed:\n"
                f"{rep.longreprtext}\naborting the MPI job\n"
            )
            sys.stderr.flush()
            comm.Abort(1)


@pytest.fixture
def device_presets():
    """The table of named devices (:data:`meshrt.plmr.PRESETS`), restored after the test, so a
    device that a test registers (:func:`meshrt.plmr.register_device`) does not outlive it."""
    from meshrt.plmr import PRESETS

    saved = dict(PRESETS)
    yield PRESETS
    PRESETS.clear()
    PRESETS.update(saved)


@pytest.fixture(params=["exact", "aggregated"])
def each_mover(request, monkeypatch):
    """Run the test once with every fabric on the exact mover and once on the aggregated one
    (the default of every ``Fabric`` built meanwhile; :mod:`meshrt.movers`)."""
    import meshrt.movers

    monkeypatch.setattr(meshrt.movers, "DEFAULT_EMULATION", request.param)
    return request.param
