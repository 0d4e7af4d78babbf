"""The control plane: rank-encoded collectives with closed-form answers, the one rank -> grid
position rule, and agreement on errors (every rank raises the same exception, none hangs).

Unmarked tests run in one process without MPI; ``mpi``-marked tests run under mpiexec on any
number of ranks (and on one rank in the serial run).
"""

import pickle

import pytest
from meshtest import rank_grids, world

import meshrt
from meshrt.fabric import Fabric
from meshrt.mesh import MeshError, MeshLayout, grid_coords
from meshrt.runtime import ControlPlane, UsageError


class CheckFailed(ValueError):
    """A picklable error of a type of our own, to see that the type travels."""


class Unpicklable(Exception):
    """An error whose constructor needs two arguments, so a pickled copy cannot be rebuilt."""

    def __init__(self, what, why):
        super().__init__(f"{what}: {why}")


def _raise(error):
    raise error


def _control():
    comm = world()
    return ControlPlane(comm if comm.Get_size() > 1 else None)


# ----------------------------------------------------------------------------------------------
# one process
# ----------------------------------------------------------------------------------------------


def test_single_is_one_rank_and_every_collective_is_local():
    c = ControlPlane.single()
    assert (c.rank, c.size, c.is_root, c.comm) == (0, 1, True, None)
    assert c.bcast({"a": 1}) == {"a": 1}
    assert c.gather(5) == [5]
    assert c.allgather("x") == ["x"]
    assert c.allreduce(3) == 3 and c.allreduce_max(2.5) == 2.5 and c.allreduce(4, op="min") == 4
    c.barrier()
    assert c.coords((1, 1)) == (0, 0)
    assert ControlPlane.of(None).size == 1 and ControlPlane.of(c) is c
    assert meshrt.ControlPlane is ControlPlane


def test_single_agree_runs_the_check_once_and_raises_its_own_error():
    c = ControlPlane.single()
    calls = []
    assert c.agree(lambda: calls.append(1) or 7) == 7
    assert c.agree(lambda: calls.append(1) or 8, on="all") == 8
    assert calls == [1, 1]
    error = CheckFailed("bad input")
    for on in ("root", "all"):
        with pytest.raises(CheckFailed) as got:
            c.agree(lambda: _raise(error), on=on)
        assert got.value is error  # untouched: no "on rank" prefix with one rank


def test_bad_arguments_are_refused():
    c = ControlPlane.single()
    with pytest.raises(ValueError, match="use 'root' or 'all'"):
        c.agree(lambda: 1, on="some")
    with pytest.raises(ValueError, match="sum, max, min"):
        c.allreduce(1, op="prod")
    with pytest.raises(MeshError, match="needs 4 ranks but 1 are running"):
        c.coords((2, 2))
    with pytest.raises(TypeError, match="ControlPlane.of"):
        ControlPlane(c)


def test_grid_coords_is_row_major():
    assert [grid_coords(r, (2, 3)) for r in range(6)] == [
        (0, 0),
        (0, 1),
        (0, 2),
        (1, 0),
        (1, 1),
        (1, 2),
    ]
    assert [grid_coords(r, (3, 1)) for r in range(3)] == [(0, 0), (1, 0), (2, 0)]
    with pytest.raises(MeshError, match="rank 6 is not in a 2x3 rank grid"):
        grid_coords(6, (2, 3))
    with pytest.raises(MeshError):
        grid_coords(-1, (2, 3))


# ----------------------------------------------------------------------------------------------
# any number of ranks
# ----------------------------------------------------------------------------------------------


@pytest.mark.mpi
def test_collectives_carry_rank_encoded_values():
    c = _control()
    n, r = c.size, c.rank
    assert (c.rank, c.size, c.is_root) == (world().Get_rank(), world().Get_size(), r == 0)
    assert c.bcast(("from", r)) == ("from", 0)
    assert c.bcast(("from", r), root=n - 1) == ("from", n - 1)
    gathered = c.gather(r * 10)
    assert gathered == ([10 * k for k in range(n)] if r == 0 else None)
    gathered = c.gather(r, root=n - 1)
    assert gathered == (list(range(n)) if r == n - 1 else None)
    assert c.allgather(r) == list(range(n))
    assert c.allreduce(r) == n * (n - 1) // 2
    assert c.allreduce_max(r) == n - 1
    assert c.allreduce(r + 1, op="min") == 1
    c.barrier()


@pytest.mark.mpi
def test_coords_match_the_cartesian_communicator_and_the_fabric():
    c = _control()
    for ry, rx in rank_grids(c.size):
        coords = c.coords((ry, rx))
        assert coords == grid_coords(c.rank, (ry, rx))
        if c.size > 1:
            cart = world().Create_cart([ry, rx], periods=[False, False], reorder=False)
            assert coords == tuple(cart.Get_coords(cart.Get_rank()))
            cart.Free()
        fab = Fabric(c, MeshLayout(2 * ry, 3 * rx, ry, rx))
        assert fab.coords == coords and fab.origin == (2 * coords[0], 3 * coords[1])
    assert c.allgather(c.coords((1, c.size))) == [(0, k) for k in range(c.size)]


@pytest.mark.mpi
def test_agree_on_root_returns_roots_value_and_runs_the_check_once():
    c = _control()
    calls = []
    got = c.agree(lambda: calls.append(1) or ("checked by", c.rank))
    assert got == ("checked by", 0)
    assert c.allreduce(len(calls)) == 1  # only rank 0 ran it


@pytest.mark.mpi
def test_agree_on_root_raises_roots_error_on_every_rank():
    c = _control()
    with pytest.raises(CheckFailed, match=r"^manifest missing$"):
        c.agree(lambda: _raise(CheckFailed("manifest missing")) if c.is_root else 1)
    with pytest.raises(UsageError) as got:
        c.agree(lambda: _raise(UsageError("--model x: no such directory")))
    assert got.value.code == "--model x: no such directory"
    c.barrier()  # every rank is still in step


@pytest.mark.mpi
def test_agree_on_all_returns_each_ranks_own_value():
    c = _control()
    assert c.agree(lambda: c.rank * 2, on="all") == c.rank * 2


@pytest.mark.mpi(min_size=2)
def test_agree_on_all_fails_everywhere_when_one_non_root_rank_fails():
    c = _control()
    bad = c.size - 1

    def check():
        if c.rank == bad:
            raise CheckFailed(f"file of rank {c.rank} is corrupt")
        return "fine"

    with pytest.raises(CheckFailed) as got:
        c.agree(check, on="all")
    assert str(got.value) == f"on rank {bad}: file of rank {bad} is corrupt"
    assert c.allgather(str(got.value)) == [str(got.value)] * c.size
    c.barrier()


@pytest.mark.mpi
def test_agree_on_all_names_the_lowest_failing_rank_without_prefix_when_all_fail():
    c = _control()
    with pytest.raises(CheckFailed, match=r"^rank 0 says no$"):
        c.agree(lambda: _raise(CheckFailed(f"rank {c.rank} says no")), on="all")
    if c.size > 2:
        with pytest.raises(CheckFailed, match=r"^on rank 1: rank 1 says no$"):
            c.agree(
                lambda: _raise(CheckFailed(f"rank {c.rank} says no")) if c.rank % 2 else 0, on="all"
            )


@pytest.mark.mpi
def test_an_error_that_cannot_travel_arrives_as_runtime_error_with_its_message():
    c = _control()
    error = Unpicklable("tokenizer", "broken")
    with pytest.raises(Exception) as got:
        c.agree(lambda: _raise(error))
    if c.is_root:
        assert got.value is error  # the rank that failed keeps its own exception
    else:
        assert type(got.value) is RuntimeError
        assert str(got.value) == "Unpicklable: tokenizer: broken"
    with pytest.raises(TypeError, match="missing 1 required positional argument"):
        pickle.loads(pickle.dumps(error))


@pytest.mark.mpi
def test_errors_outside_catch_are_not_agreed_on():
    c = _control()
    # a check that fails everywhere alike with an error it does not catch raises it locally
    with pytest.raises(KeyError):
        c.agree(lambda: _raise(KeyError("k")), on="all", catch=CheckFailed)
    c.barrier()


@pytest.mark.mpi
def test_ranks_waiting_for_the_root_sleep():
    """``bcast_idle``: while the root takes a second (a person typing), the other ranks use a
    few percent of a core, not a whole one as a spinning broadcast does; the value arrives."""
    import time

    c = _control()
    assert c.bcast_idle(("from", c.rank)) == ("from", 0)
    c.barrier()
    cpu = time.process_time()
    if c.is_root:
        time.sleep(1.0)
    value = c.bcast_idle(["line", c.rank])
    cpu = time.process_time() - cpu
    assert value == ["line", 0]
    if not c.is_root:
        assert cpu < 0.15, f"rank {c.rank} used {cpu:.2f} s of CPU waiting 1 s for the root"
