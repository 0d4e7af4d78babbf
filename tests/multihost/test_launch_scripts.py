"""jobs/mpirun.sh and jobs/launch.sh without launching anything (``DRY_RUN=1``, shell functions):
how ranks are mapped and when the script oversubscribes. ``make test-multihost`` runs them for
real across simulated hosts."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MPIRUN = ROOT / "jobs" / "mpirun.sh"
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="bash job scripts (Linux)")


def dry_run(tmp_path, *args, **env):
    full = {
        **os.environ,
        "DRY_RUN": "1",
        "SHARDS": str(tmp_path / "shards"),
        "OMP_NUM_THREADS": "1",  # as the Makefile exports: GNU nproc would answer 1
        **env,
    }
    p = subprocess.run(
        ["bash", str(MPIRUN), *args, "convert"],
        env=full,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    launch = [line for line in p.stderr.splitlines() if line.startswith("+ ")]
    return p, (launch[0] if launch else "")


def hostfile(tmp_path, text):
    path = tmp_path / "hosts"
    path.write_text(text)
    return str(path)


def test_a_hostfile_maps_by_slot_without_oversubscribing(tmp_path):
    hosts = hostfile(tmp_path, "node1 slots=2\nnode2 slots=2  # comment\n")
    p, cmd = dry_run(tmp_path, RANKS="4", HOSTFILE=hosts)
    assert p.returncode == 0, p.stderr
    assert f"--map-by slot --hostfile {hosts}" in cmd and "oversubscribe" not in cmd


def test_map_by_node_and_asked_oversubscription(tmp_path):
    hosts = hostfile(tmp_path, "node1 slots=1\nnode2 slots=1\n")
    p, cmd = dry_run(tmp_path, RANKS="4", HOSTFILE=hosts, MAP_BY="node", OVERSUBSCRIBE="1")
    assert p.returncode == 0, p.stderr
    assert "--map-by node:oversubscribe" in cmd


def test_too_few_slots_is_one_error(tmp_path):
    hosts = hostfile(tmp_path, "node1 slots=1\nnode2 slots=1\n")
    p, _ = dry_run(tmp_path, RANKS="4", HOSTFILE=hosts)
    assert p.returncode == 2
    assert "gives 2 slots for 4 ranks" in p.stderr and "OVERSUBSCRIBE=1" in p.stderr


def test_one_host_oversubscribes_only_beyond_its_cores(tmp_path):
    cores = len(os.sched_getaffinity(0))
    _, cmd = dry_run(tmp_path, RANKS=str(cores))  # OMP_NUM_THREADS=1 must not count
    assert "--map-by slot " in cmd and "slot:oversubscribe" not in cmd, cmd
    _, cmd = dry_run(tmp_path, RANKS=str(cores + 1))
    assert "--map-by slot:oversubscribe" in cmd, cmd


def test_rank_ranges():
    p = subprocess.run(
        ["bash", "-c", f"source {ROOT / 'jobs' / 'launch.sh'}; _rank_ranges 0 1 2 5 7 8"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert p.stdout.strip() == "0-2,5,7-8"
