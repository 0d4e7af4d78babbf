"""Node-local shard sets (``convert --node-local``): each node holds the rank files of its ranks
and the manifest; every rank of ``generate`` checks that it sees its own file and rank 0's
manifest.

On one host every rank sees one directory, so the per-node parts are exercised here with host
names made up per rank; ``make test-multihost`` runs the same tests on hosts with a /tmp each.
"""

import os
import shutil
import socket
import tempfile
from pathlib import Path

import numpy as np
import pytest
from goldens import FIXTURES

from llm.storage.checkpoint import load_checkpoint
from llm.storage.convert import convert
from llm.storage.shards import ShardError, open_shards, rank_file_name
from meshrt.mesh import MeshError, MeshLayout, default_rank_grid, grid_coords
from meshrt.runtime import ControlPlane

MODEL = FIXTURES / "tiny-llama-gqa"
pytestmark = pytest.mark.mpi(min_size=2)


@pytest.fixture
def world():
    from mpi4py import MPI

    return ControlPlane.of(MPI.COMM_WORLD)


@pytest.fixture
def node_local_path(world):
    """The same path on every rank, in each host's own temporary directory."""
    name = world.bcast(f"waferllm-node-local-{os.getpid()}")
    path = Path(tempfile.gettempdir()) / name
    yield path / "shards"
    world.barrier()
    shutil.rmtree(path, ignore_errors=True)


def _grid(world):
    return default_rank_grid(world.size)


def _shared_by_hosts(world, path) -> bool:
    """Whether ranks on different hosts see the same directory ``path``."""
    path.mkdir(parents=True, exist_ok=True)
    mark = path / f"seen-{world.bcast(os.getpid())}"
    if world.rank == 0:
        mark.write_text("")
    world.barrier()
    seen = world.allgather(mark.exists())
    hosts = world.allgather(socket.gethostname())
    return any(s and h != hosts[0] for s, h in zip(seen, hosts, strict=True))


def test_node_local_convert_then_every_rank_reads_its_own_file(world, node_local_path):
    grid = _grid(world)
    mesh = (2 * grid[0], 2 * grid[1])

    def node_local_convert():
        return convert(
            node_local_path,
            str(MODEL),
            meshes={"decode": mesh},
            control=world,
            progress=False,
            node_local=True,
        )

    if _shared_by_hosts(world, node_local_path.parent):  # hosts that share /tmp
        with pytest.raises(ShardError, match="shared by the nodes"):
            node_local_convert()
        return
    manifest = node_local_convert()
    hosts = world.allgather(socket.gethostname())
    mine = {
        rank_file_name(grid_coords(r, grid)) for r, h in enumerate(hosts) if h == hosts[world.rank]
    }
    present = {p.name for p in node_local_path.glob("rank*.h5")}
    assert mine <= present, "a rank file of this host is missing"
    assert len(manifest["files"]) == world.size
    assert not list(node_local_path.parent.glob("*.tmp-*")), "temporary directory left behind"
    shards = open_shards(node_local_path, world, decode_mesh=mesh)
    config, weights = load_checkpoint(MODEL)
    layout = MeshLayout(mesh[0], mesh[1], grid[0], grid[1])
    assert shards.layout("decode") == layout
    name = sorted(shards.names("decode"))[0]
    assert np.all(np.isfinite(shards.read("decode", name)))
    shards.close()


def test_node_local_needs_one_process_per_rank_file(world, node_local_path):
    with pytest.raises(MeshError, match="as many processes as the rank grid"):
        convert(
            node_local_path,
            str(MODEL),
            ranks=(world.size, 2),
            meshes={"decode": (2 * world.size, 4)},
            control=world,
            progress=False,
            node_local=True,
        )


def test_node_local_on_a_shared_directory_is_refused(world, shared_tmp_path, monkeypatch):
    """Ranks on two (made-up) hosts that see one directory: it is shared, not node-local."""
    monkeypatch.setattr(socket, "gethostname", lambda: f"node{world.rank % 2}")
    grid = _grid(world)
    with pytest.raises(ShardError, match="shared by the nodes .* convert without --node-local"):
        convert(
            shared_tmp_path / "shards",
            str(MODEL),
            meshes={"decode": (2 * grid[0], 2 * grid[1])},
            control=world,
            progress=False,
            node_local=True,
        )
    world.barrier()
    assert not list(shared_tmp_path.glob("*.tmp-*")), "temporary directory left behind"


@pytest.mark.parametrize("damage", ["missing", "other"])
def test_a_rank_without_rank_0s_manifest_is_named(damage, world, shared_tmp_path):
    """Each rank opens its own copy (as on node-local disks): the last rank's manifest is
    missing, or is another conversion's."""
    grid = _grid(world)
    mesh = (2 * grid[0], 2 * grid[1])
    base = shared_tmp_path / "node0" / "shards"
    convert(base, str(MODEL), meshes={"decode": mesh}, control=world, progress=False)
    last = world.size - 1
    mine = base
    if world.rank == last:
        mine = shared_tmp_path / "node1" / "shards"
        shutil.copytree(base, mine)
        manifest = mine / "manifest.json"
        if damage == "missing":
            manifest.unlink()
        else:
            manifest.write_text(manifest.read_text().replace("\n", "\n ", 1))
    world.barrier()
    phrase = "has no manifest.json" if damage == "missing" else "differs from rank 0's"
    with pytest.raises(ShardError, match=f"on rank {last}: .*{phrase}"):
        open_shards(mine, world, decode_mesh=mesh)
