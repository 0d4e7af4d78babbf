"""Shards on disk: convert, read back exactly, validate, fail clearly; ``python -m llm`` commands.

MPI-marked tests run on any rank count (in a directory every rank sees: ``shared_tmp_path``); the
failure paths run whole processes, as a user would, and must end within seconds with one message.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from goldens import FIXTURES

from llm.placement.decode_tiles import decode_tile_shapes, decode_tiles
from llm.placement.layout import PhaseLayout
from llm.storage.checkpoint import load_checkpoint
from llm.storage.convert import RandomWeights, convert, load_source
from llm.storage.shards import (
    MANIFEST_NAME,
    ShardError,
    ShardSet,
    content_hash,
    open_shards,
    rank_file_name,
    read_manifest,
)
from meshrt.fabric import Fabric
from meshrt.hostio import local_block
from meshrt.mesh import MeshLayout, default_rank_grid
from meshrt.precision import round_to_bf16
from meshrt.runtime import LOCAL_MPI_ENV, ControlPlane

ROOT = Path(__file__).resolve().parents[3]
MODELS = ["tiny-llama-gqa", "tiny-qwen2"]
BIN = os.path.dirname(sys.executable)
MPIEXEC = os.environ.get("MPIEXEC", os.path.join(BIN, "mpiexec"))
ENV = dict(os.environ, **LOCAL_MPI_ENV, PYTHONUNBUFFERED="1")
for _launcher_var in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "PMI_RANK"):
    ENV.pop(_launcher_var, None)  # child processes are never ranks of this test's job
needs_mpiexec = pytest.mark.skipif(not os.path.exists(MPIEXEC), reason="no mpiexec in the venv")


def _world():
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    return comm if comm.Get_size() > 1 else None


def _grid_and_mesh(comm):
    size = 1 if comm is None else comm.Get_size()
    ry, rx = default_rank_grid(size)
    return (ry, rx), (2 * ry, 2 * rx)


def _fabric(comm, mesh, grid):
    return Fabric(comm, MeshLayout(*mesh, *grid))


# ----------------------------------------------------------------------------------------------
# on every rank count
# ----------------------------------------------------------------------------------------------


@pytest.mark.mpi
@pytest.mark.parametrize("model", MODELS)
def test_convert_and_read_back_exactly(model, shared_tmp_path):
    comm = _world()
    control = ControlPlane.of(comm)
    grid, mesh = _grid_and_mesh(comm)
    out = shared_tmp_path / f"{model}-shards"
    manifest = convert(
        out,
        str(FIXTURES / model),
        ranks=grid,
        meshes={"decode": mesh},
        control=control,
        progress=False,
    )
    assert manifest["rank_grid"] == list(grid)
    assert not list(shared_tmp_path.glob("*.tmp-*")), "temporary directory left behind"

    shards = open_shards(out, control, decode_mesh=mesh)
    config, weights = load_checkpoint(FIXTURES / model)
    assert shards.config == config and shards.mesh("decode") == mesh and shards.ranks == grid
    fab = _fabric(comm, mesh, grid)
    assert shards.coords == fab.coords
    names = []
    for name, tiles in decode_tiles(PhaseLayout(config, *mesh), weights):
        names.append(name)
        assert manifest["phases"]["decode"]["tensors"][name] == list(tiles.shape)
        block = shards.read("decode", name)
        assert block.dtype == np.float32
        np.testing.assert_array_equal(block, local_block(fab, tiles), err_msg=name)
    assert shards.names("decode") == names
    shards.close()


def _as_float16(x):
    return x.astype(np.float16).astype(np.float32)


@pytest.mark.mpi
@pytest.mark.parametrize(
    "dtype,stored,rtol", [("float16", _as_float16, 1e-3), ("bfloat16", round_to_bf16, 4e-3)]
)
def test_16bit_storage_and_random_preset(shared_tmp_path, dtype, stored, rtol):
    comm = _world()
    control = ControlPlane.of(comm)
    grid, mesh = _grid_and_mesh(comm)
    out = shared_tmp_path / f"random-{dtype}"
    manifest = convert(
        out,
        "random:tiny-llama",
        ranks=grid,
        meshes={"decode": mesh},
        dtype=dtype,
        control=control,
        seed=3,
        layers=1,
        progress=False,
    )
    assert manifest["dtype"] == dtype and manifest["config"]["num_layers"] == 1
    assert manifest["source"] == "random preset tiny-llama seed 3 (first 1 of 2 layers)"
    config, weights, _ = load_source("random:tiny-llama", seed=3, layers=1)
    shards = open_shards(out, control)  # meshes taken from the manifest
    fab = _fabric(comm, shards.mesh("decode"), shards.ranks)
    for name, tiles in decode_tiles(PhaseLayout(config, *mesh), weights):
        block = shards.read("decode", name)
        want = local_block(fab, tiles)
        assert block.dtype == np.float32
        np.testing.assert_array_equal(block, stored(want))  # exactly what was stored
        np.testing.assert_allclose(block, want, rtol=rtol, atol=1e-6, err_msg=name)
    shards.close()


@pytest.mark.mpi
def test_validation_errors_are_the_same_on_every_rank(shared_tmp_path):
    comm = _world()
    control = ControlPlane.of(comm)
    grid, mesh = _grid_and_mesh(comm)
    out = shared_tmp_path / "validate"
    convert(
        out,
        "random:tiny-llama",
        ranks=grid,
        meshes={"decode": mesh},
        control=control,
        layers=1,
        progress=False,
    )
    wrong = (mesh[0] * 2, mesh[1])
    with pytest.raises(ShardError, match=f"run with --decode-mesh {mesh[0]}x{mesh[1]}"):
        open_shards(out, control, decode_mesh=wrong)
    with pytest.raises(ShardError, match="holds no prefill|hold no prefill"):
        open_shards(out, control, prefill_mesh=mesh)
    if comm is not None:
        comm.Barrier()
        if comm.Get_rank() == 0:  # damage the last rank's file only
            last = rank_file_name((grid[0] - 1, grid[1] - 1))
            with open(out / last, "ab") as f:
                f.write(b"\0")
        comm.Barrier()
        with pytest.raises(ShardError, match="truncated or was replaced"):
            open_shards(out, control)  # every rank raises, not only the last one
    with pytest.raises(ShardError, match="already exists: pass --force"):
        convert(
            out,
            "random:tiny-llama",
            ranks=grid,
            meshes={"decode": mesh},
            control=control,
            layers=1,
            progress=False,
        )


# ----------------------------------------------------------------------------------------------
# one process
# ----------------------------------------------------------------------------------------------


def test_one_process_converts_for_a_bigger_rank_grid(tmp_path):
    out = tmp_path / "s22"
    m = convert(
        out,
        str(FIXTURES / "tiny-llama-gqa"),
        ranks=(2, 2),
        meshes={"decode": (4, 6)},
        progress=False,
    )
    assert sorted(m["files"]) == [rank_file_name((a, b)) for a in range(2) for b in range(2)]
    config, weights = load_checkpoint(FIXTURES / "tiny-llama-gqa")
    sets = [ShardSet(out, read_manifest(out), (a, b)) for a in range(2) for b in range(2)]
    for name, tiles in decode_tiles(PhaseLayout(config, 4, 6), weights):
        for s in sets:
            y0, x0 = s.coords[0] * 2, s.coords[1] * 3
            np.testing.assert_array_equal(s.read("decode", name), tiles[y0 : y0 + 2, x0 : x0 + 3])
    for s in sets:
        s.close()


def test_random_weights_are_lazy_and_match_truncation():
    full, w_full, _ = load_source("random:tiny-llama", seed=1)
    short, w_short, label = load_source("random:tiny-llama", seed=1, layers=1)
    assert short.num_layers == 1 and "first 1 of 2" in label
    assert isinstance(w_full, RandomWeights) and len(w_short) < len(w_full)
    name = "model.layers.0.mlp.down_proj.weight"
    np.testing.assert_array_equal(w_full[name], w_short[name])


@pytest.mark.parametrize("model", MODELS)
def test_plan_shapes_match_the_tile_producer(model):
    config, weights = load_checkpoint(FIXTURES / model)
    for mesh in [(1, 1), (2, 3), (4, 4), (6, 2)]:
        lay = PhaseLayout(config, *mesh)
        assert {n: t.shape for n, t in decode_tiles(lay, weights)} == decode_tile_shapes(lay)


def test_plan_reads_the_placement():
    from llm.cost.memory_budget import memory_budget
    from llm.cost.wafer import kv_capacity, place_phase
    from llm.modeling.config import preset
    from meshrt.plmr import get_device

    device = get_device("wse2")
    for name, mesh in [
        ("llama3-8b", (600, 600)),
        ("qwen2-72b", (720, 700)),
        ("tiny-llama", (4, 6)),
    ]:
        config = preset(name)
        plan = memory_budget(config, mesh, mesh, "wse2", 1024)
        pl = place_phase(config, device, mesh, "decode", 1024, 1024)
        assert plan["phases"]["decode"]["weight_bytes_per_core"] == [
            s.weight_bytes for s in pl.stages
        ]
        cap = kv_capacity(config, device, mesh)
        assert (plan["kv_capacity"]["shift"], plan["kv_capacity"]["concat"]) == (
            cap["shift"],
            cap["concat"],
        )


# ----------------------------------------------------------------------------------------------
# whole processes: the failure paths a user meets
# ----------------------------------------------------------------------------------------------


def run(args, n=None, timeout=60):
    cmd = ([MPIEXEC, "-n", str(n)] if n else []) + [sys.executable, "-m", "llm"] + args
    t0 = time.monotonic()
    p = subprocess.run(
        cmd,
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    return p, time.monotonic() - t0


def assert_one_clear_error(p, dt, *phrases):
    assert p.returncode != 0, p.stdout + p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, p.stderr
    for phrase in phrases:
        assert phrase in errors[0], errors[0]
    assert "Traceback" not in p.stderr, p.stderr
    assert dt < 20, f"took {dt:.1f} s"


@pytest.fixture(scope="module")
def shard_sets(tmp_path_factory):
    """Shards of tiny-llama-gqa for a 2x2 rank grid (4x4 mesh) and for one rank (2x2 mesh)."""
    base = tmp_path_factory.mktemp("shard-sets")
    model = str(FIXTURES / "tiny-llama-gqa")
    convert(base / "r22", model, ranks=(2, 2), meshes={"decode": (4, 4)}, progress=False)
    convert(base / "r11", model, ranks=(1, 1), meshes={"decode": (2, 2)}, progress=False)
    convert(base / "r12", model, ranks=(1, 2), meshes={"decode": (2, 2)}, progress=False)
    return base


def _copy(shard_sets, name, tmp_path) -> Path:
    dst = tmp_path / name
    shutil.copytree(shard_sets / name, dst)
    return dst


def test_wrong_rank_count(shard_sets):
    p, dt = run(["info", str(shard_sets / "r22"), "--verify"])
    assert_one_clear_error(
        p,
        dt,
        "converted for rank grid 2x2 (4 ranks) but 1 rank is running",
        "mpiexec -n 4",
        "--ranks 1x1",
    )


def test_wrong_mesh(shard_sets):
    p, dt = run(["info", str(shard_sets / "r11"), "--verify", "--decode-mesh", "4x4"])
    assert_one_clear_error(
        p, dt, "decode tiles for a 2x2 virtual mesh but 4x4 was requested", "--decode-mesh 2x2"
    )


def test_missing_rank_file(shard_sets, tmp_path):
    s = _copy(shard_sets, "r11", tmp_path)
    (s / rank_file_name((0, 0))).unlink()
    p, dt = run(["info", str(s), "--verify"])
    assert_one_clear_error(p, dt, "rank000x000.h5", "is missing", "convert again")


def test_corrupt_rank_file(shard_sets, tmp_path):
    s = _copy(shard_sets, "r11", tmp_path)
    path = s / rank_file_name((0, 0))
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 16):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    p, dt = run(["info", str(s), "--verify"])
    assert_one_clear_error(p, dt, "rank000x000.h5 is corrupt", "convert again")


def test_unknown_layout_version_and_edited_manifest(shard_sets, tmp_path):
    s = _copy(shard_sets, "r11", tmp_path)
    m = json.loads((s / MANIFEST_NAME).read_text())
    m["layout_version"] = 999
    (s / MANIFEST_NAME).write_text(json.dumps(m))
    p, dt = run(["info", str(s), "--verify"])
    assert_one_clear_error(p, dt, "layout version 999", "convert again")
    m["layout_version"] = read_manifest(shard_sets / "r11")["layout_version"]
    m["dtype"] = "float16"
    (s / MANIFEST_NAME).write_text(json.dumps(m))
    with pytest.raises(ShardError, match="modified after conversion"):
        read_manifest(s)
    m["content_hash"] = content_hash(m)
    (s / MANIFEST_NAME).write_text(json.dumps(m))
    with pytest.raises(ShardError, match="belongs to a different conversion"):
        open_shards(s, verify=False)


def test_existing_target_needs_force(tmp_path):
    out = tmp_path / "out"
    args = [
        "convert",
        str(FIXTURES / "tiny-qwen2"),
        "--out",
        str(out),
        "--decode-mesh",
        "2x2",
        "--ranks",
        "1x1",
        "-q",
    ]
    p, _ = run(args)
    assert p.returncode == 0, p.stderr
    first = read_manifest(out)["created"]
    p, dt = run(args)
    assert_one_clear_error(p, dt, "already exists", "--force")
    assert read_manifest(out)["created"] == first  # untouched
    p, _ = run(args + ["--force", "--dtype", "float16"])
    assert p.returncode == 0, p.stderr
    assert read_manifest(out)["dtype"] == "float16"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["out"]  # nothing left behind
    (tmp_path / "user-data").mkdir()
    (tmp_path / "user-data" / "notes.txt").write_text("keep me")
    p, dt = run(args[:3] + [str(tmp_path / "user-data")] + args[4:] + ["--force"])
    assert_one_clear_error(p, dt, "is not a shard set")
    assert (tmp_path / "user-data" / "notes.txt").exists()


@needs_mpiexec
def test_one_damaged_rank_ends_every_rank_with_one_message(shard_sets, tmp_path):
    s = _copy(shard_sets, "r12", tmp_path)
    path = s / rank_file_name((0, 1))  # only rank 1's file
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    p, dt = run(["info", str(s), "--verify"], n=2)
    assert_one_clear_error(p, dt, "rank000x001.h5 is corrupt")
    p, dt = run(["info", str(shard_sets / "r22"), "--verify"], n=2)
    assert_one_clear_error(p, dt, "2 ranks are running", "mpiexec -n 4", "--ranks 1x2")
    p, _ = run(["info", str(shard_sets / "r12"), "--verify", "--json"], n=2)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["ranks"] == 2


# ----------------------------------------------------------------------------------------------
# info, plan, help
# ----------------------------------------------------------------------------------------------


def test_info_describes_shards_and_presets(shard_sets):
    p, _ = run(["info", str(shard_sets / "r22")])
    assert p.returncode == 0, p.stderr
    for phrase in (
        "tiny-llama-gqa (llama)",
        "rank grid:   2x2 (4 ranks)",
        "decode mesh: 4x4 virtual cores (2x2 per rank)",
        "rope_layout",
        "q_order",
        "rank001x001.h5",
        "float32 on disk",
    ):
        assert phrase in p.stdout, p.stdout
    p, _ = run(["info", "--preset", "llama3-8b"])
    assert p.returncode == 0 and "128256" in p.stdout and "rope_scaling" in p.stdout
    p, dt = run(["info", "--preset", "nonexistent"])
    assert_one_clear_error(p, dt, "unknown preset")


def test_plan_text_and_json():
    p, _ = run(["plan", "--preset", "llama3-8b", "--decode-mesh", "660x660", "--json"])
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    d = r["phases"]["decode"]
    assert d["mesh"] == [660, 660] and d["fits"]
    assert r["kv_capacity"]["shift"] > 0 and r["kv_capacity"]["concat"] > 0
    assert 0 < d["weights_bytes"] <= 48 * 1024
    p, _ = run(["plan", "--preset", "llama-100m", "--decode-mesh", "8x8"])
    assert p.returncode == 0 and "fits: NO" in p.stdout and "smallest square" in p.stdout
    p, _ = run(["plan", "--model", str(FIXTURES / "tiny-qwen2"), "--decode-mesh", "4x4"])
    assert p.returncode == 0 and "tiny-qwen2" in p.stdout and "fits one wafer: yes" in p.stdout


def test_help_and_argument_parsers():
    p, _ = run(["--help"])
    assert p.returncode == 0 and "examples" in p.stdout and "mpi4py" in p.stdout
    from llm.__main__ import build_parser

    parser = build_parser()
    g = parser.parse_args(
        [
            "generate",
            "--model",
            "m",
            "--prompt-ids",
            "1,2",
            "--stop",
            "2",
            "--stop",
            "END",
            "--kv-policy",
            "concat",
            "--allreduce",
            "ring",
            "--decode-mesh",
            "4x4",
            "--no-stream",
            "--json",
        ]
    )
    assert (g.stop, g.kv_policy, g.allreduce, g.decode_mesh, g.no_stream, g.json) == (
        ["2", "END"],
        "concat",
        "ring",
        "4x4",
        True,
        True,
    )
    b = parser.parse_args(["bench", "--preset", "llama3-8b", "--layers", "1", "--repeat", "2"])
    assert (b.preset, b.layers, b.repeat, b.warmup, b.decode_mesh) == ("llama3-8b", 1, 2, 1, None)
    p, dt = run(["convert", "x", "--out", "y", "--decode-mesh", "0x4"])
    assert_one_clear_error(p, dt, "decode mesh '0x4'")
