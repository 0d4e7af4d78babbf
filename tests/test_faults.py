"""The fault matrix of the command line (issue 10), one process per case.

Every case runs the real CLI as a subprocess with a timeout and asserts the exit code, the one
``error:`` line, the wall time (no hang) and that no file outside the intended output changed.
Cases that happen only with several ranks are in ``test_faults_mpi.py``.
"""
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from faultcase import FIXTURES, assert_one_error, changed, run, snapshot
from llm.convert import convert
from llm.shards import MANIFEST_NAME, file_sha256, rank_file_name, read_manifest

MODEL = FIXTURES / "tiny-llama-gqa"


@pytest.fixture(scope="module")
def r11(tmp_path_factory):
    """A 1-rank shard set of tiny-llama-gqa on a 2x2 mesh (copied by the tests that edit it)."""
    out = tmp_path_factory.mktemp("faults") / "r11"
    convert(out, str(MODEL), ranks=(1, 1), meshes={"decode": (2, 2)}, progress=False)
    return out


def _convert_args(out, *extra):
    return ["convert", MODEL, "--out", out, "--decode-mesh", "2x2", "--ranks", "1x1", "-q",
            *extra]


# ----------------------------------------------------------------------------------------------
# 1. convert --force replaces only a shard set, and only the files its manifest lists
# ----------------------------------------------------------------------------------------------

def test_force_refuses_a_directory_with_a_foreign_manifest(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "manifest.json").write_text(json.dumps({"name": "my web app", "icons": []}))
    (site / "thesis.tex").write_text("\\documentclass{article}")
    before = snapshot(tmp_path, MODEL)
    p, dt = run(_convert_args(site, "--force"))
    assert_one_error(p, dt, str(site), "not a waferllm-mpi-shards manifest", "refusing")
    assert changed(before, snapshot(tmp_path, MODEL)) == []


def test_force_refuses_unlisted_files_unless_told(tmp_path, r11):
    out = tmp_path / "shards"
    shutil.copytree(r11, out)
    (out / "thesis.tex").write_text("chapter 1")
    before = snapshot(tmp_path, MODEL)
    p, dt = run(_convert_args(out, "--force"))
    assert_one_error(p, dt, "thesis.tex", "does not list", "--delete-other-files")
    assert changed(before, snapshot(tmp_path, MODEL)) == []

    p, _ = run(_convert_args(out, "--force", "--delete-other-files", "--dtype", "float16"))
    assert p.returncode == 0, p.stderr
    assert not (out / "thesis.tex").exists()
    assert read_manifest(out)["dtype"] == "float16"
    assert changed(before, snapshot(tmp_path, MODEL), allowed=[out]) == []


def test_force_deletes_only_listed_files(tmp_path):
    out = tmp_path / "shards"
    p, _ = run(["convert", MODEL, "--out", out, "--decode-mesh", "2x2", "--ranks", "1x2", "-q"])
    assert p.returncode == 0, p.stderr
    assert (out / rank_file_name((0, 1))).exists()
    before = snapshot(tmp_path, MODEL)
    p, _ = run(_convert_args(out, "--force"))         # 1x2 -> 1x1: rank000x001.h5 goes away
    assert p.returncode == 0, p.stderr
    assert sorted(x.name for x in out.iterdir()) == sorted(
        [MANIFEST_NAME, rank_file_name((0, 0)), "tokenizer.json", "generation_config.json"])
    assert sorted(x.name for x in tmp_path.iterdir()) == ["shards"]   # no .tmp-/.old- left
    assert changed(before, snapshot(tmp_path, MODEL), allowed=[out]) == []


def test_force_refuses_a_manifest_that_lists_paths(tmp_path, r11):
    out = tmp_path / "shards"
    shutil.copytree(r11, out)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    m = json.loads((out / MANIFEST_NAME).read_text())
    m["copied_files"] = ["../victim.txt"]
    (out / MANIFEST_NAME).write_text(json.dumps(m))
    before = snapshot(tmp_path, MODEL)
    p, dt = run(_convert_args(out, "--force"))
    assert_one_error(p, dt, "lists paths")
    assert changed(before, snapshot(tmp_path, MODEL)) == []


# ----------------------------------------------------------------------------------------------
# 2. singletons: the launcher says N tasks, MPI says 1
# ----------------------------------------------------------------------------------------------

SINGLETONS = {
    "srun-none": ({"SLURM_STEP_NUM_TASKS": "4", "SLURM_NTASKS": "4", "SLURM_STEP_ID": "0",
                   "SLURM_PROCID": "0"}, ["srun started 4 tasks", "srun --mpi=pmix"]),
    "srun-old": ({"SLURM_NTASKS": "4", "SLURM_STEP_ID": "0"},
                 ["SLURM_NTASKS=4", "srun --mpi=pmix"]),
    "srun-rank": ({"SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "3"}, ["SLURM_PROCID=3"]),
    "mpiexec-died": ({"OMPI_COMM_WORLD_SIZE": "4"}, ["OMPI_COMM_WORLD_SIZE=4", "mpiexec"]),
    "pmi": ({"PMI_SIZE": "2", "PMI_RANK": "1"}, ["PMI_SIZE=2", "srun --mpi=pmix"]),
    "pmix": ({"PMIX_RANK": "2"}, ["PMIX_RANK=2"]),
}


@pytest.mark.parametrize("case", list(SINGLETONS))
def test_singleton_of_a_parallel_launch_stops(case, tmp_path):
    env, phrases = SINGLETONS[case]
    out = tmp_path / "out"
    before = snapshot(tmp_path, MODEL)
    p, dt = run(_convert_args(out), env=env)
    assert_one_error(p, dt, "MPI sees", "alone", *phrases)
    assert changed(before, snapshot(tmp_path, MODEL)) == []           # nothing published
    p, dt = run(["info", "--mesh", "2x2"], env=env, module="meshrt")
    assert_one_error(p, dt, *phrases)


def test_single_task_launch_still_runs(tmp_path):
    p, _ = run(["info", "--mesh", "2x2"], module="meshrt",
               env={"SLURM_STEP_NUM_TASKS": "1", "SLURM_NTASKS": "1", "SLURM_PROCID": "0"})
    assert p.returncode == 0, p.stderr


# ----------------------------------------------------------------------------------------------
# 8. file safety: rank files hold only their own data; index paths stay inside the model
# ----------------------------------------------------------------------------------------------

def _restamp(shards: Path, fname: str) -> None:
    """Update the manifest's size and sha256 of an edited rank file (as a forger would)."""
    m = json.loads((shards / MANIFEST_NAME).read_text())
    m["files"][fname].update(bytes=(shards / fname).stat().st_size,
                             sha256=file_sha256(shards / fname))
    (shards / MANIFEST_NAME).write_text(json.dumps(m))


def _forge(shards: Path, secret: Path, how: str) -> None:
    fname = rank_file_name((0, 0))
    with h5py.File(shards / fname, "r+") as f:
        name = "decode/embed"
        real = f[name][()]
        del f[name]
        secret.write_bytes(np.arange(real.size, dtype=real.dtype).tobytes())
        if how == "external":
            f.create_dataset(name, shape=real.shape, dtype=real.dtype,
                             external=[(str(secret), 0, real.nbytes)])
        elif how == "virtual":
            with h5py.File(secret.with_suffix(".h5"), "w") as g:
                g["x"] = real
            layout = h5py.VirtualLayout(shape=real.shape, dtype=real.dtype)
            layout[...] = h5py.VirtualSource(str(secret.with_suffix(".h5")), "x", real.shape)
            f.create_virtual_dataset(name, layout)
        elif how == "external-link":
            with h5py.File(secret.with_suffix(".h5"), "w") as g:
                g["x"] = real
            f[name] = h5py.ExternalLink(str(secret.with_suffix(".h5")), "x")
    _restamp(shards, fname)


@pytest.mark.parametrize("how", ["external", "virtual", "external-link"])
def test_rank_file_reading_other_files_is_rejected(how, tmp_path, r11):
    shards = tmp_path / "shards"
    shutil.copytree(r11, shards)
    _forge(shards, tmp_path / "secret.bin", how)
    before = snapshot(tmp_path, MODEL)
    p, dt = run(["generate", "--model", shards, "--prompt-ids", "1,2,3", "--max-new-tokens",
                 "2"])
    assert_one_error(p, dt, "rank000x000.h5 refers to data outside itself", "decode/embed")
    p, dt = run(["info", shards, "--verify"])
    assert_one_error(p, dt, "refers to data outside itself")
    assert changed(before, snapshot(tmp_path, MODEL)) == []


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_safetensors_index_outside_the_model_is_rejected(where, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(MODEL, model)
    outside = tmp_path / "outside.safetensors"
    (model / "model.safetensors").rename(outside)
    from safetensors import safe_open
    with safe_open(str(outside), framework="np") as f:
        names = list(f.keys())
    target = "../outside.safetensors" if where == "parent" else str(outside)
    (model / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {n: target for n in names}}))
    before = snapshot(tmp_path, MODEL)
    p, dt = run(["convert", model, "--out", tmp_path / "out", "--decode-mesh", "2x2", "-q"])
    assert_one_error(p, dt, "outside the model directory", repr(target))
    p, dt = run(["generate", "--model", model, "--prompt-ids", "1,2", "--max-new-tokens", "1"])
    assert_one_error(p, dt, "outside the model directory")
    assert changed(before, snapshot(tmp_path, MODEL)) == []


# ----------------------------------------------------------------------------------------------
# 7. temporary directories of dead conversions are removed; live or foreign ones are kept
# ----------------------------------------------------------------------------------------------

def _dead_pid() -> int:
    import subprocess
    import sys
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_next_convert_removes_temporaries_it_can_prove_dead(tmp_path):
    import os
    import socket
    out = tmp_path / "out"
    dead, foreign, live = (tmp_path / f"out.tmp-{k}" for k in (1, 2, 3))
    for path, host, pid in ((dead, socket.gethostname(), _dead_pid()),
                            (foreign, "another-node", 4242), (live, socket.gethostname(),
                                                              os.getpid())):
        path.mkdir()
        (path / "rank000x000.h5").write_bytes(b"x" * 1000)
        (path / ".convert-owner.json").write_text(json.dumps({"host": host, "pid": pid}))
    before = snapshot(tmp_path, MODEL)
    p, _ = run(_convert_args(out))
    assert p.returncode == 0, p.stderr
    assert not dead.exists() and foreign.exists() and live.exists()
    assert "removed out.tmp-1" in p.stderr and "out.tmp-2, out.tmp-3" in p.stderr
    assert changed(before, snapshot(tmp_path, MODEL), allowed=[out, dead]) == []


def test_killed_convert_is_cleaned_up_by_the_next(tmp_path):
    import signal
    import subprocess
    import sys
    import time
    from faultcase import ENV, ROOT
    out = tmp_path / "out"
    job = subprocess.Popen([sys.executable, "-m", "llm", "convert", "random:llama-100m",
                            "--out", str(out), "--decode-mesh", "4x4", "-q"], cwd=ROOT, env=ENV,
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob("out.tmp-*/rank*.h5")) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert list(tmp_path.glob("out.tmp-*")), "the conversion never started writing"
    finally:
        job.send_signal(signal.SIGKILL)
        job.wait(timeout=30)
    assert list(tmp_path.glob("out.tmp-*")) and not out.exists()
    p, dt = run(_convert_args(out))
    assert p.returncode == 0 and dt < 30, p.stderr
    assert sorted(x.name for x in tmp_path.iterdir()) == ["out"]
