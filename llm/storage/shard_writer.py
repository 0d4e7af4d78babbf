"""Writing shard sets atomically: per-rank HDF5 files in a temporary directory, then a rename.

The format is described in :mod:`llm.storage.shards`. :func:`prepare_target` checks the target and
makes
``<out_dir>.tmp-<pid>`` (the same answer on every rank); each process writes its rank files with a
:class:`ShardWriter`; rank 0 gathers the checksums on the control plane and :func:`publish`
writes the manifest last and renames the directory. A reader never sees a partial shard set.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
from pathlib import Path
from typing import TypedDict

import numpy as np

from meshrt.mesh import MeshLayout
from meshrt.runtime import ControlPlane

from .shards import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    STORAGE_DTYPES,
    ShardError,
    encode_storage,
    file_sha256,
    grid_text,
    rank_file_name,
)


class FileRecord(TypedDict):
    """A rank file's entry in the manifest's ``files``."""

    rank: list[int]  # (Ry, Rx) coordinates of the rank that reads the file
    bytes: int
    sha256: str


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
        if dtype not in STORAGE_DTYPES:
            raise ShardError(
                f"storage dtype {dtype!r} is not supported; use one of {', '.join(STORAGE_DTYPES)}"
            )
        self.directory = Path(directory)
        self.grid = tuple(grid)
        self.dtype_name = dtype
        self.files = {}
        for c in coords:
            self.files[tuple(c)] = _create_h5(self.directory / rank_file_name(c))
        self.bytes_written = 0

    def add(self, phase: str, name: str, tiles: np.ndarray, mesh: tuple[int, int]) -> None:
        """Store every owned rank's block of the global tile array ``tiles[Py, Px, ...]``."""
        lay = MeshLayout(mesh[0], mesh[1], *self.grid)
        if tuple(tiles.shape[:2]) != (lay.py, lay.px):
            raise ShardError(
                f"{phase}/{name}: tiles of shape {tiles.shape} do not match the "
                f"{grid_text(mesh)} mesh"
            )
        for coords, f in self.files.items():
            y0, x0 = lay.origin(coords)
            block = encode_storage(tiles[y0 : y0 + lay.by, x0 : x0 + lay.bx], self.dtype_name)
            if self.dtype_name == "float16" and not np.isfinite(block).all():
                raise ShardError(
                    f"{phase}/{name} overflows float16 storage (values up to "
                    f"{np.abs(tiles).max():.3g}); convert with --dtype bfloat16 "
                    "or float32"
                )
            try:
                f.create_dataset(f"{phase}/{name}", data=block)  # contiguous, no chunking
                f.flush()  # a full disk fails here, not later inside a destructor
            except (OSError, RuntimeError) as e:
                raise write_error(e, f.filename) from None
            self.bytes_written += block.nbytes

    def finish(self, manifest_hash: str) -> dict[str, FileRecord]:
        """Stamp, close and checksum every file; returns the manifest's ``files`` entries."""
        records: dict[str, FileRecord] = {}
        for coords, f in self.files.items():
            f.attrs["format"] = FORMAT_NAME
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["rank"] = np.asarray(coords, dtype=np.int64)
            f.attrs["rank_grid"] = np.asarray(self.grid, dtype=np.int64)
            f.attrs["manifest_hash"] = manifest_hash
            f.attrs["dtype"] = self.dtype_name
            path = Path(f.filename)
            f.close()
            records[path.name] = {
                "rank": list(coords),
                "bytes": path.stat().st_size,
                "sha256": file_sha256(path),
            }
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


#: Written into a temporary directory while a conversion runs: who owns it (host, pid, start).
OWNER_NAME = ".convert-owner.json"


def _create_h5(path):
    """A new HDF5 file whose writes go straight to disk (no sieve buffer), so that a full disk
    fails the write that hit it, as an ``OSError``, instead of a later destructor."""
    import h5py

    fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    fapl.set_sieve_buf_size(0)
    fapl.set_fclose_degree(h5py.h5f.CLOSE_STRONG)
    try:
        fid = h5py.h5f.create(os.fsencode(path), h5py.h5f.ACC_TRUNC, fapl=fapl)
    except (OSError, RuntimeError) as e:
        raise write_error(e, path) from None
    return h5py.File(fid)


def write_error(error: BaseException, filename) -> OSError:
    """An HDF5 write failure as an ``OSError`` with the errno HDF5 reports (``ENOSPC``...)."""
    import re

    found = re.search(r"errno = (\d+)", str(error))
    errno = int(found.group(1)) if found else getattr(error, "errno", None)
    if errno:
        return OSError(errno, os.strerror(errno), str(filename))
    return OSError(f"writing {filename} failed: {' '.join(str(error).split())}")


def prepare_target(
    out_dir, control: ControlPlane, force: bool, delete_other_files: bool = False
) -> Path:
    """Check the target and make the temporary directory (rank 0), the same answer on all ranks.

    Returns the temporary directory ``<out_dir>.tmp-<pid>`` (a sibling, so the final rename
    stays on one filesystem). Raises :class:`ShardError` on every rank if the target exists and
    may not be replaced (see :func:`replaceable_files`), or if the directory is not visible on
    every rank. Temporary directories of earlier conversions whose process is provably dead
    (same host, that process gone) are removed; others are reported.
    """
    out = Path(out_dir).absolute()

    def make_temporary() -> str:
        tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
        make_temporary_dir(out, tmp, force, delete_other_files)
        return str(tmp)

    tmp = Path(control.agree(make_temporary, catch=ShardError))
    missing = [r for r, seen in enumerate(control.allgather(tmp.is_dir())) if not seen]
    if missing:
        if control.is_root:
            shutil.rmtree(tmp, ignore_errors=True)
        raise ShardError(
            f"the output directory {tmp.parent} is not visible on every rank (use a "
            "filesystem shared by all nodes, or convert --node-local to write on each node "
            "the files of the ranks it hosts); missing on: "
            + "; ".join(f"rank {r}" for r in missing[:4])
            + ("; ..." if len(missing) > 4 else "")
        )
    return tmp


def make_temporary_dir(out: Path, tmp: Path, force: bool, delete_other_files: bool) -> None:
    """Check that ``out`` may be written (:func:`replaceable_files`), remove the temporaries
    of dead conversions, and make ``tmp`` afresh with its owner file; ``ShardError`` if not."""
    try:
        replaceable_files(out, force, delete_other_files)
        _remove_dead_temporaries(out, tmp)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        (tmp / OWNER_NAME).write_text(json.dumps(_owner()) + "\n")
    except OSError as e:
        raise ShardError(str(e)) from None


def replaceable_files(out: Path, force: bool, delete_other_files: bool = False) -> list | None:
    """What replacing ``out`` would delete, or :class:`ShardError` if it may not be replaced.

    Only a shard set is ever replaced: an existing ``out`` needs ``force``, must be a real
    directory (not a symlink) and either be empty or hold a ``manifest.json`` of this format.
    Files its manifest does not list (``manifest.json`` itself, the rank files and the copied
    tokenizer files) make it refuse, unless ``delete_other_files`` says to delete them too.

    Returns
    -------
    list of str or None
        ``None`` if ``out`` does not exist; else the names (relative to ``out``) the manifest
        lists, which :func:`publish` deletes.
    """
    if not out.exists() and not out.is_symlink():
        return None
    if not force:
        raise ShardError(
            f"{out} already exists: pass --force to replace it, or choose another output directory"
        )
    if out.is_symlink() or not out.is_dir():
        raise ShardError(f"{out} exists and is not a directory; refusing to replace it")
    entries = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    if not entries:
        return []
    listed = _listed_files(out)
    others = [e for e in entries if e not in listed]
    if others and not delete_other_files:
        shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        raise ShardError(
            f"{out} holds {len(others)} file(s) its shard manifest does not list "
            f"({shown}); refusing to delete them: move them away, or pass "
            "--delete-other-files as well"
        )
    return sorted(listed & set(entries))


def _listed_files(out: Path) -> set:
    """Names the shard manifest of ``out`` accounts for (ShardError if it has none)."""
    mpath = out / MANIFEST_NAME
    refuse = f"{out} is not a shard set ({{}}); refusing to replace it even with --force"
    if not mpath.is_file():
        raise ShardError(refuse.format(f"no {MANIFEST_NAME}"))
    try:
        m = json.loads(mpath.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise ShardError(refuse.format(f"{MANIFEST_NAME} is not JSON")) from None
    if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
        raise ShardError(refuse.format(f"its {MANIFEST_NAME} is not a {FORMAT_NAME} manifest"))
    names = list(m.get("files") or {}) + list(m.get("copied_files") or [])
    if not all(
        isinstance(n, str) and n and n == Path(n).name and n not in (".", "..") for n in names
    ):
        raise ShardError(refuse.format(f"its {MANIFEST_NAME} lists paths, not file names"))
    return {MANIFEST_NAME, *names}


def _owner() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": _start_time(os.getpid())}


def _start_time(pid: int) -> str | None:
    """Start time of process ``pid`` in clock ticks since boot (Linux), to tell a reused pid."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[19]
    except (OSError, IndexError):
        return None


def _owner_is_dead(tmp: Path) -> bool:
    """Whether the conversion that made ``tmp`` provably ended (same host, process gone)."""
    try:
        owner = json.loads((tmp / OWNER_NAME).read_text())
        host, pid, start = owner["host"], int(owner["pid"]), owner.get("start")
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if host != socket.gethostname():
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    return start is not None and _start_time(pid) not in (None, start)


def _remove_dead_temporaries(out: Path, keep: Path) -> None:
    log = logging.getLogger("llm")
    alive = []
    for path in sorted(out.parent.glob(f"{out.name}.tmp-*")):
        if path == keep or not path.is_dir() or path.is_symlink():
            continue
        if _owner_is_dead(path):
            shutil.rmtree(path, ignore_errors=True)
            log.warning(f"removed {path.name}, left over by an interrupted conversion")
        else:
            alive.append(path.name)
    if alive:
        log.warning(
            f"not removed (another conversion may be writing them, or they come from "
            f"another host): {', '.join(alive)}"
        )


def remove_temporary(tmp) -> None:
    """Delete a temporary shard directory after a failed conversion (errors ignored)."""
    shutil.rmtree(tmp, ignore_errors=True)


def _rename_no_replace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst`` unless ``dst`` exists (``FileExistsError``), atomically where
    the kernel offers it (Linux ``renameat2(RENAME_NOREPLACE)``)."""
    import ctypes
    import errno

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        renameat2 = None
    if renameat2 is not None:
        at_fdcwd, noreplace = -100, 1
        if renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), noreplace) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(err, os.strerror(err), str(dst))
        if err not in (errno.ENOSYS, errno.EINVAL):  # those two: no such rename here
            raise OSError(err, os.strerror(err), str(dst))
    if dst.exists() or dst.is_symlink():
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def publish(
    tmp_dir,
    out_dir,
    manifest: dict,
    delete_other_files: bool = False,
    force: bool = False,
    present=None,
) -> Path:
    """Write the manifest last and rename the finished temporary directory to ``out_dir``.

    Called on one process (rank 0) after every rank file is complete. ``out_dir`` is checked
    again (:func:`replaceable_files`): without ``force``, a set that appeared during the run
    (another conversion into the same directory) is never replaced. With ``force``, an existing
    ``out_dir`` is moved aside first; then only the files its manifest lists are deleted
    (everything, with ``delete_other_files``). Anything else that appeared there meanwhile is
    kept in ``<out_dir>.old-<pid>`` and reported. ``present``: the rank files this directory
    holds (a node-local shard set), by default all the manifest lists.
    """
    tmp, out = Path(tmp_dir), Path(out_dir).absolute()
    for fname, rec in manifest["files"].items():
        if present is not None and fname not in present:
            continue
        path = tmp / fname
        if not path.exists() or path.stat().st_size != rec["bytes"]:
            raise ShardError(
                f"{path} is missing or incomplete after writing: are all ranks "
                "writing to a shared filesystem?"
            )
    listed = replaceable_files(out, force, delete_other_files)
    staged = tmp / (MANIFEST_NAME + ".partial")
    staged.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(staged, tmp / MANIFEST_NAME)
    (tmp / OWNER_NAME).unlink(missing_ok=True)
    old = None
    if listed is not None:
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        os.rename(out, old)
    try:
        _rename_no_replace(tmp, out)
    except FileExistsError:
        raise ShardError(
            f"{out} appeared while this conversion ran (another conversion into the same "
            "directory?); it was kept: pass --force to replace it, or choose another output "
            "directory"
        ) from None
    if old is not None:
        if delete_other_files:
            shutil.rmtree(old, ignore_errors=True)
            return out
        assert listed is not None, "an old directory exists only if out did, and out was listed"
        for name in listed:
            (old / name).unlink(missing_ok=True)
        try:
            old.rmdir()
        except OSError:
            logging.getLogger("llm").warning(
                f"kept {old}: files appeared in {out} during the conversion"
            )
    return out
