"""Shard sets on node-local disks (``convert --node-local``).

Clusters often give each node a disk of its own (local NVMe scratch) that the other nodes cannot
see. There, every node holds the rank files of the ranks it hosts and a copy of the manifest,
all at the same path. Converting runs one process per rank file, placed on the nodes as the
ranks of the later ``generate`` will be: rank R writes the file of rank R, and the first rank on
each node (by host name) makes that node's temporary directory, then writes the manifest and
renames it. ``generate`` then checks on every rank that its own file and the manifest are there
and that the manifest is rank 0's (:func:`llm.storage.shards.open_shards`).
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from meshrt.mesh import grid_coords
from meshrt.runtime import ControlPlane

from .shard_writer import make_temporary_dir, publish, remove_temporary
from .shards import ShardError, rank_file_name


@dataclass(frozen=True)
class Nodes:
    """Where the converting ranks run: ``hosts[r]`` is rank r's host name."""

    hosts: tuple[str, ...]
    rank: int

    @property
    def leader(self) -> int:
        """The lowest rank on this rank's host: it makes the node's directory."""
        return self.hosts.index(self.hosts[self.rank])

    @property
    def leaders(self) -> list[int]:
        return sorted({self.hosts.index(h) for h in self.hosts})

    @property
    def leads(self) -> bool:
        return self.rank == self.leader

    def files(self, grid: tuple[int, int]) -> list[str]:
        """The rank files of the ranks on this rank's host."""
        here = self.hosts[self.rank]
        return [rank_file_name(grid_coords(r, grid)) for r, h in enumerate(self.hosts) if h == here]


def nodes(control: ControlPlane) -> Nodes:
    """Every rank's host name (collective)."""
    return Nodes(tuple(control.allgather(socket.gethostname())), control.rank)


def _temporary(out: Path, host: str, pid: int) -> Path:
    return out.with_name(f"{out.name}.tmp-{host}-{pid}")


def prepare_target(
    out_dir, control: ControlPlane, where: Nodes, force: bool, delete_other_files: bool = False
) -> Path:
    """Each node's temporary directory, made by its first rank; the same answer on all ranks.

    Raises :class:`ShardError` on every rank if a node's target may not be replaced, if a rank
    does not see its node's directory, or if a rank sees another node's (the directory is
    shared: convert without ``--node-local``).
    """
    out = Path(out_dir).absolute()
    pids = control.allgather(os.getpid())
    temps = {r: _temporary(out, where.hosts[r], pids[r]) for r in where.leaders}
    tmp = temps[where.leader]

    def make_temporary() -> None:
        if where.leads:
            make_temporary_dir(out, tmp, force, delete_other_files)

    control.agree(make_temporary, on="all", catch=ShardError)

    def check_visible() -> None:
        if not tmp.is_dir():
            raise ShardError(
                f"the output directory {out.parent} differs between the ranks of host "
                f"{where.hosts[where.rank]}: this rank does not see {tmp.name}"
            )
        shared = [where.hosts[r] for r, t in temps.items() if r != where.leader and t.is_dir()]
        if shared:
            here = where.hosts[where.rank]
            raise ShardError(
                f"the output directory {out.parent} is shared by the nodes ({here} sees the "
                f"files of {shared[0]}): convert without --node-local"
            )

    with _cleaned_up_on_error(where, tmp):
        control.agree(check_visible, on="all", catch=ShardError)
    return tmp


@contextlib.contextmanager
def _cleaned_up_on_error(where, tmp):
    """A :class:`ShardError` inside (agreed by every rank) removes the node's temporary
    directory ``tmp`` (its leading rank does) before it goes on."""
    try:
        yield
    except ShardError:
        if where.leads:
            remove_temporary(tmp)
        raise


def finish(
    control: ControlPlane,
    where: Nodes,
    gathered,
    manifest: dict,
    tmp: Path,
    out_dir,
    write_files,
    delete_other_files: bool = False,
    force: bool = False,
) -> dict:
    """Rank 0 lists every rank's file in the manifest; then each node's first rank writes the
    manifest and the copied files into its directory and renames it. Returns the manifest."""

    def collect() -> dict:
        assert gathered is not None, "collect runs on rank 0, which gathered every rank"
        failures = [f for _, _, f in gathered if f]
        if failures:
            more = f" (and {len(failures) - 1} more rank(s))" if len(failures) > 1 else ""
            raise ShardError(failures[0] + more)
        if len({h for h, _, _ in gathered}) != 1:
            raise ShardError(
                "ranks produced different tensor lists or shapes (the tile producers are not "
                "deterministic); nothing was written"
            )
        files: dict = {}
        for _, recs, _ in gathered:
            files.update(recs)
        return dict(sorted(files.items()))

    def publish_here() -> None:
        if not where.leads:
            return
        try:
            write_files(tmp)  # tokenizer and HF config travel with the shards, on every node
            publish(tmp, out_dir, manifest, delete_other_files, force, present=where.files(grid))
        except OSError as e:
            raise ShardError(
                f"writing the shard set on {where.hosts[where.rank]} failed: {e}"
            ) from None

    grid = (int(manifest["rank_grid"][0]), int(manifest["rank_grid"][1]))
    with _cleaned_up_on_error(where, tmp):
        manifest["files"] = control.agree(collect, catch=ShardError)
        control.agree(publish_here, on="all", catch=ShardError)
    return manifest
