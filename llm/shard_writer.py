"""Writing shard sets atomically: per-rank HDF5 files in a temporary directory, then a rename.

The format is described in :mod:`llm.shards`. :func:`prepare_target` checks the target and makes
``<out_dir>.tmp-<pid>`` (the same answer on every rank); each process writes its rank files with a
:class:`ShardWriter`; rank 0 gathers the checksums on the control plane and :func:`publish`
writes the manifest last and renames the directory. A reader never sees a partial shard set.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np

from meshrt.mesh import MeshLayout

from .shards import (encode_storage, FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME, STORAGE_DTYPES, ShardError,
                     comm_rank, file_sha256, grid_text, raise_if_any, rank_file_name,
                     root_bcast)


class ShardWriter:
    """Writes the rank files one process is responsible for into a (temporary) directory.

    One process may write several rank files (a conversion may run on fewer processes than the
    rank grid it converts for); file ``k`` of the grid goes to process ``k % nprocs``.

    Parameters
    ----------
    directory : path
        Existing directory to write into.
    grid : (int, int)
        Rank grid ``(Ry, Rx)`` the shards are for.
    coords : list of (int, int)
        The ranks whose files this process writes.
    dtype : {"float32", "float16", "bfloat16"}
        Storage dtype (bfloat16 is stored as raw 16-bit words).
    """

    def __init__(self, directory, grid: tuple[int, int], coords: list, dtype: str):
        import h5py
        if dtype not in STORAGE_DTYPES:
            raise ShardError(f"storage dtype {dtype!r} is not supported; use one of "
                             f"{', '.join(STORAGE_DTYPES)}")
        self.directory = Path(directory)
        self.grid = tuple(grid)
        self.dtype_name = dtype
        self.files = {tuple(c): h5py.File(self.directory / rank_file_name(c), "w")
                      for c in coords}
        self.bytes_written = 0

    def add(self, phase: str, name: str, tiles: np.ndarray, mesh: tuple[int, int]) -> None:
        """Store every owned rank's block of the global tile array ``tiles[Py, Px, ...]``."""
        lay = MeshLayout(mesh[0], mesh[1], *self.grid)
        if tuple(tiles.shape[:2]) != (lay.py, lay.px):
            raise ShardError(f"{phase}/{name}: tiles of shape {tiles.shape} do not match the "
                             f"{grid_text(mesh)} mesh")
        for coords, f in self.files.items():
            y0, x0 = lay.origin(coords)
            block = encode_storage(tiles[y0:y0 + lay.by, x0:x0 + lay.bx], self.dtype_name)
            if self.dtype_name == "float16" and not np.isfinite(block).all():
                raise ShardError(f"{phase}/{name} overflows float16 storage (values up to "
                                 f"{np.abs(tiles).max():.3g}); convert with --dtype bfloat16 "
                                 "or float32")
            f.create_dataset(f"{phase}/{name}", data=block)     # contiguous, no chunking
            self.bytes_written += block.nbytes

    def finish(self, manifest_hash: str) -> dict:
        """Stamp, close and checksum every file; returns the manifest's ``files`` entries."""
        records = {}
        for coords, f in self.files.items():
            f.attrs["format"] = FORMAT_NAME
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["rank"] = np.asarray(coords, dtype=np.int64)
            f.attrs["rank_grid"] = np.asarray(self.grid, dtype=np.int64)
            f.attrs["manifest_hash"] = manifest_hash
            f.attrs["dtype"] = self.dtype_name
            path = Path(f.filename)
            f.close()
            records[path.name] = {"rank": list(coords), "bytes": path.stat().st_size,
                                  "sha256": file_sha256(path)}
        self.files = {}
        return records

    def abort(self) -> None:
        """Close every file without stamping it (after an error)."""
        for f in self.files.values():
            try:
                f.close()
            except Exception:  # noqa: BLE001 - closing after an error must not hide it
                pass
        self.files = {}


def prepare_target(out_dir, comm, force: bool) -> Path:
    """Check the target and make the temporary directory (rank 0), the same answer on all ranks.

    Returns the temporary directory ``<out_dir>.tmp-<pid>`` (a sibling, so the final rename
    stays on one filesystem). Raises :class:`ShardError` on every rank if the target exists and
    ``force`` is not set, or if the directory is not visible on every rank.
    """
    out = Path(out_dir).absolute()
    answer = None
    if comm_rank(comm) == 0:
        try:
            _check_replaceable(out, force)
            tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
            stale = sorted(p.name for p in out.parent.glob(f"{out.name}.tmp-*") if p != tmp)
            if stale:
                logging.getLogger("llm").warning(
                    f"left over from interrupted conversions (safe to delete): {', '.join(stale)}")
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            answer = ("ok", str(tmp))
        except (ShardError, OSError) as e:
            answer = ("error", str(e))
    status, text = root_bcast(comm, answer)
    if status == "error":
        raise ShardError(text)
    tmp = Path(text)
    visible = tmp.is_dir()
    raise_if_any(comm, None if visible else f"rank {comm_rank(comm)}",
                 prefix=f"the output directory {tmp.parent} is not visible on every rank "
                        "(use a filesystem shared by all nodes); missing on: ")
    return tmp


def _check_replaceable(out: Path, force: bool) -> None:
    if not out.exists():
        return
    if not force:
        raise ShardError(f"{out} already exists: pass --force to replace it, or choose another "
                         "output directory")
    if not out.is_dir():
        raise ShardError(f"{out} exists and is not a directory; refusing to replace it")
    if not (out / MANIFEST_NAME).exists() and any(out.iterdir()):
        raise ShardError(f"{out} exists and is not a shard set (no {MANIFEST_NAME}); refusing "
                         "to replace it even with --force")


def publish(tmp_dir, out_dir, manifest: dict) -> Path:
    """Write the manifest last and rename the finished temporary directory to ``out_dir``.

    Called on one process (rank 0) after every rank file is complete. An existing ``out_dir``
    (already checked by :func:`prepare_target`) is moved aside first and deleted at the end.
    """
    tmp, out = Path(tmp_dir), Path(out_dir).absolute()
    for fname, rec in manifest["files"].items():
        path = tmp / fname
        if not path.exists() or path.stat().st_size != rec["bytes"]:
            raise ShardError(f"{path} is missing or incomplete after writing: are all ranks "
                             "writing to a shared filesystem?")
    staged = tmp / (MANIFEST_NAME + ".partial")
    staged.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(staged, tmp / MANIFEST_NAME)
    old = None
    if out.exists():
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out
