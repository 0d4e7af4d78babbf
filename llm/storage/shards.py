"""Checkpoint shards on disk: one HDF5 file per rank plus a JSON manifest.

A **shard set** is a directory::

    manifest.json          what was converted, for which meshes, and a checksum of every file
    rank000x000.h5         rank (0, 0)'s blocks
    rank000x001.h5         rank (0, 1)'s blocks
    ...

Rank ``(ry, rx)`` of an ``Ry x Rx`` rank grid is MPI rank ``ry * Rx + rx`` (row-major,
:meth:`meshrt.runtime.ControlPlane.coords`, the order :class:`meshrt.fabric.Fabric` uses). Its file
holds, per phase, one contiguous dataset per tensor, ``/{phase}/{name}`` (for example
``/decode/layer0/qkv``), equal to the rank's block ``[by, bx, *tile]`` of the global tile array
``[Py, Px, *tile]``. Root attributes name the rank and the manifest's content hash, so a file
from another conversion is recognised.

Manifest (JSON object)
----------------------
``format``, ``format_version``
    ``"waferllm-mpi-shards"`` and :data:`FORMAT_VERSION`.
``layout_version``
    :data:`llm.placement.layout.LAYOUT_VERSION` of the feature placement the tiles follow.
``config``, ``parameters``
    :meth:`ModelConfig.to_dict` and the model's parameter count.
``source``, ``created``
    The HF directory's name or ``"random preset NAME seed S"``; UTC ISO time.
``dtype``
    Storage dtype, ``"float32"``, ``"float16"`` or ``"bfloat16"`` (raw 16-bit words). Blocks are
    upcast once to float32 at load.
``rank_grid``
    ``[Ry, Rx]``.
``copied_files``
    Files of the HF directory copied beside the shards (``tokenizer.json``,
    ``generation_config.json``, ...), so that a shard set stands alone.
``phases``
    ``{phase: {"mesh": [Py, Px], "layout": PhaseLayout.describe(),
    "tensors": {name: [Py, Px, *tile]}}}`` in production order.
``content_hash``
    sha256 of every field above (canonical JSON); the rank files carry it too.
``files``
    ``{"rank000x000.h5": {"rank": [ry, rx], "bytes": n, "sha256": hex}}``.

Writing is atomic (:mod:`llm.storage.shard_writer`): everything goes into a temporary sibling
directory that is renamed when complete. Reading (:func:`open_shards`) validates the
manifest and this rank's file on every rank before any tensor is read, and every rank raises
the same :class:`ShardError`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from meshrt.mesh import MeshError, MeshLayout, grid_coords
from meshrt.precision import STORAGE_DTYPES as PRECISIONS
from meshrt.precision import bf16_words, from_bf16_words
from meshrt.runtime import ControlPlane

from ..modeling.config import ConfigError, ModelConfig
from ..placement.layout import LAYOUT_VERSION, mesh_pair

FORMAT_NAME = "waferllm-mpi-shards"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
STORAGE_DTYPES = PRECISIONS  # float32, float16, bfloat16 (as raw 16-bit words)
_HASH_CHUNK = 8 << 20


def encode_storage(block: np.ndarray, dtype: str) -> np.ndarray:
    """A float32 block as stored on disk in ``dtype``."""
    if dtype == "bfloat16":
        return bf16_words(block)
    return np.ascontiguousarray(block, dtype=np.dtype(dtype))


def decode_storage(data: np.ndarray, dtype: str) -> np.ndarray:
    """A stored block back as float32 (exact for every storage dtype)."""
    if dtype == "bfloat16":
        return from_bf16_words(data)
    return data.astype(np.float32, copy=False)


class ShardError(ValueError):
    """A shard set that is missing, damaged, or converted for another rank grid or mesh.

    The message names the mismatch and what would fix it. Raised identically on every rank.
    """


# ----------------------------------------------------------------------------------------------
# names and hashes
# ----------------------------------------------------------------------------------------------


def rank_file_name(coords: tuple[int, int]) -> str:
    """File name of rank ``(ry, rx)``: ``rank{ry:03d}x{rx:03d}.h5``."""
    return f"rank{coords[0]:03d}x{coords[1]:03d}.h5"


def content_hash(manifest: Mapping) -> str:
    """sha256 of the manifest without ``files`` and ``content_hash`` (canonical JSON)."""
    core = {k: v for k, v in manifest.items() if k not in ("files", "content_hash")}
    text = json.dumps(core, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def file_sha256(path) -> str:
    """Hex sha256 of a file's bytes, read in large chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def grid_text(grid) -> str:
    return f"{grid[0]}x{grid[1]}"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


# ----------------------------------------------------------------------------------------------
# manifest reading and description
# ----------------------------------------------------------------------------------------------


def read_manifest(path) -> dict:
    """Parse and check the manifest of the shard set at ``path`` (one process, no MPI).

    Raises :class:`ShardError` if it is missing, not JSON, of another format or layout
    version, incomplete, or edited after conversion.
    """
    path = Path(path)
    return parse_manifest(_read_manifest_text(path), path)


def _read_manifest_text(path: Path) -> str:
    mpath = path / MANIFEST_NAME
    if not path.exists():
        raise ShardError(
            f"shard directory {path} does not exist: convert a model first "
            "(python -m llm convert SOURCE --out DIR)"
        )
    if not mpath.exists():
        hint = " (a conversion that did not finish?)" if ".tmp-" in path.name else ""
        raise ShardError(
            f"{path} has no {MANIFEST_NAME}: it is not a complete shard set{hint}; convert again"
        )
    try:
        return mpath.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ShardError(f"cannot read {mpath}: {e}") from None


def parse_manifest(text: str, path) -> dict:
    """Parse and check manifest text (see :func:`read_manifest`)."""
    mpath = Path(path) / MANIFEST_NAME
    try:
        m = json.loads(text)
    except json.JSONDecodeError as e:
        raise ShardError(f"{mpath} is not valid JSON ({e}); convert again") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
        raise ShardError(f"{mpath} is not a {FORMAT_NAME} manifest")
    if m.get("format_version") != FORMAT_VERSION:
        raise ShardError(
            f"{mpath} has shard format version {m.get('format_version')!r} but "
            f"this code reads version {FORMAT_VERSION}: convert again from the "
            f"source ({m.get('source', '?')}) with this version"
        )
    if m.get("layout_version") != LAYOUT_VERSION:
        raise ShardError(
            f"shards at {path} have layout version {m.get('layout_version')!r} but "
            f"this code places weights with layout version {LAYOUT_VERSION}: "
            f"convert again from the source ({m.get('source', '?')})"
        )
    required = ("config", "dtype", "rank_grid", "phases", "files", "content_hash")
    missing = [k for k in required if k not in m]
    if missing:
        raise ShardError(f"{mpath} lacks {missing}; convert again")
    if m["content_hash"] != content_hash(m):
        raise ShardError(
            f"{mpath} was modified after conversion (its content hash does not "
            "match); convert again"
        )
    if m["dtype"] not in STORAGE_DTYPES:
        raise ShardError(f"{mpath}: unknown storage dtype {m['dtype']!r}")
    grid = tuple(m["rank_grid"])
    expected = {rank_file_name(grid_coords(r, grid)) for r in range(grid[0] * grid[1])}
    if set(m["files"]) != expected:
        raise ShardError(
            f"{mpath} lists files {sorted(m['files'])[:4]}... but a "
            f"{grid_text(grid)} rank grid needs {sorted(expected)[:4]}..."
        )
    try:
        ModelConfig.from_dict(m["config"])
    except (ConfigError, TypeError, NotImplementedError) as e:
        raise ShardError(f"{mpath}: model config is not readable by this code ({e})") from None
    return m


def describe_manifest(m: Mapping, path=None) -> str:
    """The manifest in human form (what ``python -m llm info SHARDS`` prints)."""
    c = ModelConfig.from_dict(m["config"])
    grid = m["rank_grid"]
    lines = []
    if path is not None:
        lines.append(f"shard set:   {path}")
    lines += [
        f"format:      {m['format']} v{m['format_version']}, layout version {m['layout_version']}",
        f"model:       {c.name or '?'} ({c.family}), {c.num_layers} layers, hidden "
        f"{c.hidden_size}, ffn {c.intermediate_size}, heads {c.num_heads} (kv "
        f"{c.num_kv_heads}) x {c.head_dim}, vocab {c.vocab_size}, context "
        f"{c.max_position_embeddings}",
        f"parameters:  {m.get('parameters', c.num_parameters()):,}"
        f"{', tied embeddings' if c.tie_word_embeddings else ''}",
        f"source:      {m.get('source', '?')}",
        f"created:     {m.get('created', '?')}",
        f"dtype:       {m['dtype']} on disk, float32 compute",
        f"rank grid:   {grid_text(grid)} ({_plural(grid[0] * grid[1], 'rank')})",
    ]
    if m.get("copied_files"):
        lines.append(f"also holds:  {', '.join(m['copied_files'])}")
    for phase, ph in m["phases"].items():
        py, px = ph["mesh"]
        lay = ph.get("layout", {})
        lines.append(
            f"{phase} mesh: {py}x{px} virtual cores ({py // grid[0]}x{px // grid[1]} per "
            f"rank), {_plural(len(ph['tensors']), 'tensor')}"
        )
        padded = ", ".join(
            f"{k} {lay[k]}" for k in ("hidden", "ffn", "vocab", "kv", "q") if k in lay
        )
        if padded:
            lines.append(f"  padded sizes: {padded}")
        for key in ("rope_layout", "q_order", "padding"):
            if key in lay:
                lines.append(f"  {key}: {lay[key]}")
        for key, value in lay.items():
            if key not in (
                "mesh",
                "hidden",
                "ffn",
                "vocab",
                "kv",
                "q",
                "rope_layout",
                "q_order",
                "padding",
            ):
                lines.append(f"  {key}: {value}")
    sizes = [rec["bytes"] for rec in m["files"].values()]
    lines.append(
        f"files:       {len(sizes)}, {_human(sum(sizes))} in total "
        f"(min {_human(min(sizes))}, max {_human(max(sizes))} per rank)"
    )
    for fname, rec in sorted(m["files"].items()):
        lines.append(
            f"  {fname}  rank {tuple(rec['rank'])}  {_human(rec['bytes']):>10}  "
            f"sha256 {rec['sha256'][:16]}..."
        )
    return "\n".join(lines)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


# ----------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------


class ShardSet:
    """This rank's view of a validated shard set (see :func:`open_shards`).

    Attributes
    ----------
    path : Path
    manifest : dict
    config : ModelConfig
    ranks : (int, int)
        Rank grid ``(Ry, Rx)``.
    coords : (int, int)
        This rank's ``(ry, rx)``.
    phases : list of str
        Phases held, in manifest order (``"decode"``, and ``"prefill"`` if converted).
    dtype : str
        Storage dtype; :meth:`read` always returns float32.
    """

    def __init__(self, path: Path, manifest: dict, coords: tuple[int, int]):
        self.path = Path(path)
        self.manifest = manifest
        self.config = ModelConfig.from_dict(manifest["config"])
        self.ranks = mesh_pair(manifest["rank_grid"])
        self.coords = mesh_pair(coords)
        self.phases = list(manifest["phases"])
        self.dtype = manifest["dtype"]
        self.file_name = rank_file_name(self.coords)
        self.bytes_read = 0
        self._file = None

    def mesh(self, phase: str) -> tuple[int, int]:
        """Virtual mesh ``(Py, Px)`` of ``phase``."""
        return mesh_pair(self._phase(phase)["mesh"])

    def layout(self, phase: str) -> MeshLayout:
        """The :class:`MeshLayout` of ``phase`` on the shard set's rank grid."""
        return MeshLayout(*self.mesh(phase), *self.ranks)

    def names(self, phase: str) -> list[str]:
        """Tensor names of ``phase`` in production order (e.g. ``embed``, ``layer0/qkv``)."""
        return list(self._phase(phase)["tensors"])

    def global_shape(self, phase: str, name: str) -> tuple:
        """Global tile shape ``(Py, Px, *tile)`` of a tensor."""
        tensors = self._phase(phase)["tensors"]
        if name not in tensors:
            raise KeyError(
                f"no tensor {name!r} in phase {phase!r} of {self.path}; it holds "
                f"{', '.join(list(tensors)[:6])}, ..."
            )
        return tuple(tensors[name])

    def block_shape(self, phase: str, name: str) -> tuple:
        """This rank's block shape ``(by, bx, *tile)`` of a tensor."""
        shape = self.global_shape(phase, name)
        return (shape[0] // self.ranks[0], shape[1] // self.ranks[1]) + shape[2:]

    def read(self, phase: str, name: str, words: bool = False) -> np.ndarray:
        """This rank's block ``f32[by, bx, *tile]`` of tensor ``name`` of ``phase``; with
        ``words`` the stored words as they are (float16, or bfloat16 as ``uint16``)."""
        want = self.block_shape(phase, name)
        data = self.dataset(phase, name)[()]
        if data.shape != want:
            raise ShardError(
                f"{self.path / self.file_name}: {phase}/{name} has shape "
                f"{data.shape}, expected {want}; convert again"
            )
        self.bytes_read += data.nbytes
        if words:
            return data.astype(np.uint16, copy=False) if self.dtype == "bfloat16" else data
        return decode_storage(data, self.dtype)

    def dataset(self, phase: str, name: str):
        """The HDF5 dataset of this rank's block (read lazily by slicing)."""
        return self._h5()[f"{phase}/{name}"]

    def describe(self) -> str:
        """Human-readable summary (as ``python -m llm info`` prints it)."""
        return describe_manifest(self.manifest, self.path)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _phase(self, phase: str) -> dict:
        if phase not in self.manifest["phases"]:
            raise KeyError(
                f"{self.path} holds no {phase!r} tiles (phases: "
                f"{', '.join(self.phases)}); convert with --{phase}-mesh"
            )
        return self.manifest["phases"][phase]

    def _h5(self):
        if self._file is None:
            import h5py

            self._file = h5py.File(self.path / self.file_name, "r", locking=False)
        return self._file


def _wanted_meshes(meshes, decode_mesh, prefill_mesh) -> dict:
    wanted = {}
    for phase, mesh in dict(meshes or {}).items():
        wanted[phase] = mesh
    for phase, mesh in (("decode", decode_mesh), ("prefill", prefill_mesh)):
        if mesh is not None:
            wanted[phase] = mesh
    out: dict[str, tuple[tuple[int, int], tuple[int, int] | None]] = {}
    for phase, mesh in wanted.items():
        if mesh is None:
            continue
        if isinstance(mesh, MeshLayout):
            out[phase] = ((mesh.py, mesh.px), (mesh.ry, mesh.rx))
        else:
            out[phase] = (mesh_pair(int(v) for v in mesh), None)
    return out


def check_against_run(m: Mapping, nranks: int, meshes: Mapping, ranks) -> None:
    """Raise :class:`ShardError` unless the manifest fits this run.

    Pure function of its arguments, so every rank reaches the same verdict without talking.
    ``meshes`` maps phase -> ``((Py, Px), rank grid or None)``; ``ranks`` is the requested
    rank grid or ``None``.
    """
    grid = tuple(m["rank_grid"])
    need = grid[0] * grid[1]
    if need != nranks:
        running = (
            f"{nranks} ranks are running" if nranks > 1 else "1 rank is running (no MPI launcher)"
        )
        try:
            alt = f"--ranks {grid_text(_default_grid_for(nranks, m))}"
        except MeshError:
            alt = "a rank grid that divides the meshes"
        raise ShardError(
            f"shards were converted for rank grid {grid_text(grid)} "
            f"({_plural(need, 'rank')}) but {running}: run with mpiexec -n {need} "
            f"or convert again with {alt}"
        )
    requested = [tuple(ranks)] if ranks is not None else []
    requested += [g for _, g in meshes.values() if g is not None]
    for g in requested:
        if tuple(g) != grid:
            raise ShardError(
                f"shards were converted for rank grid {grid_text(grid)} but rank "
                f"grid {grid_text(g)} was requested: omit --ranks or convert again "
                f"with --ranks {grid_text(g)}"
            )
    for phase, (mesh, _) in meshes.items():
        if phase not in m["phases"]:
            raise ShardError(
                f"shards hold no {phase} tiles (phases: "
                f"{', '.join(m['phases'])}) but a {phase} mesh "
                f"{grid_text(mesh)} was requested: omit --{phase}-mesh or convert "
                f"again with --{phase}-mesh {grid_text(mesh)}"
            )
        have = tuple(m["phases"][phase]["mesh"])
        if have != tuple(mesh):
            raise ShardError(
                f"shards hold {phase} tiles for a {grid_text(have)} virtual mesh "
                f"but {grid_text(mesh)} was requested: run with --{phase}-mesh "
                f"{grid_text(have)} (or omit it) or convert again with "
                f"--{phase}-mesh {grid_text(mesh)}"
            )


def _default_grid_for(nranks: int, m: Mapping) -> tuple[int, int]:
    from math import gcd

    from meshrt.mesh import default_rank_grid

    py = px = 0
    for ph in m["phases"].values():
        py, px = gcd(py, ph["mesh"][0]), gcd(px, ph["mesh"][1])
    return default_rank_grid(nranks, py or None, px or None)


def check_rank_file(path: Path, m: Mapping, coords: tuple[int, int], verify: bool) -> str | None:
    """Problem with this rank's file, or ``None`` if it is sound (size always, sha256 if
    ``verify``, and its root attributes)."""
    fname = rank_file_name(coords)
    fpath = path / fname
    rec = m["files"][fname]
    if not fpath.exists():
        return (
            f"{fname} (rank {tuple(coords)}) is missing from {path}: the shard set is "
            "incomplete; convert again"
        )
    size = fpath.stat().st_size
    if size != rec["bytes"]:
        return (
            f"{fname} has {size} bytes but the manifest says {rec['bytes']}: the file is "
            "truncated or was replaced; convert again"
        )
    if verify and file_sha256(fpath) != rec["sha256"]:
        return f"{fname} is corrupt (sha256 differs from the manifest); convert again"
    try:
        import h5py

        with h5py.File(fpath, "r", locking=False) as f:
            attrs = dict(f.attrs)
            unsafe = foreign_storage(f)
    except OSError as e:
        return f"{fname} cannot be opened as HDF5 ({e}); convert again"
    if unsafe:
        return (
            f"{fname} refers to data outside itself ({unsafe}); shard files hold "
            "only contiguous datasets of their own: convert again"
        )
    if attrs.get("manifest_hash") != m["content_hash"]:
        return f"{fname} belongs to a different conversion than {MANIFEST_NAME}; convert again"
    if tuple(np.asarray(attrs.get("rank", (-1, -1))).tolist()) != tuple(coords):
        return f"{fname} holds the blocks of another rank; convert again"
    return None


def foreign_storage(group) -> str | None:
    """The first object of an open HDF5 file or group whose data lives outside the file.

    The sha256 of a rank file covers only its own bytes, so a dataset with external storage,
    a virtual dataset, or a soft or external link could make a reader load any other file:
    none of them is ever written by :class:`llm.storage.shard_writer.ShardWriter`.

    Returns
    -------
    str or None
        ``"path: what"`` of the first such object, ``None`` if there is none.
    """
    import h5py

    for name in group:
        link = group.get(name, getlink=True)
        path = f"{group.name.rstrip('/')}/{name}"
        if isinstance(link, h5py.ExternalLink):
            return f"{path}: external link to {link.filename}"
        if isinstance(link, h5py.SoftLink):
            return f"{path}: soft link to {link.path}"
        obj = group[name]
        if isinstance(obj, h5py.Group):
            found = foreign_storage(obj)
            if found:
                return found
        elif isinstance(obj, h5py.Dataset):
            if obj.is_virtual:
                return f"{path}: virtual dataset"
            if obj.external:
                return f"{path}: external storage in {obj.external[0][0]!r}"
    return None


def open_shards(
    path,
    control: ControlPlane | None = None,
    meshes: Mapping | None = None,
    *,
    decode_mesh=None,
    prefill_mesh=None,
    ranks=None,
    verify: bool = True,
) -> ShardSet:
    """Open a shard set for this run after validating it on every rank.

    Collective over ``control``: rank 0 reads the manifest and broadcasts it; every rank checks
    it against the run (rank count, rank grid, each requested phase mesh) and checks its own
    file (exists, size, sha256 if ``verify``, root attributes); the ranks agree on the outcome,
    so that every rank raises the same :class:`ShardError`. No tensor is read here.

    Parameters
    ----------
    path : path
        The shard directory.
    control : ControlPlane, optional
        The ranks of the run; by default one process.
    meshes : dict, optional
        ``{phase: (Py, Px) or MeshLayout}`` the run wants; phases left out (or ``None``) take
        the manifest's mesh.
    decode_mesh, prefill_mesh : (int, int), optional
        Shorthands for ``meshes["decode"]`` / ``meshes["prefill"]``.
    ranks : (int, int), optional
        Requested rank grid (default: the manifest's).
    verify : bool
        Check the sha256 of this rank's file (slow for big models); sizes are always checked.

    Returns
    -------
    ShardSet
        This rank's view; :meth:`ShardSet.read` gives its float32 blocks.
    """
    control = control or ControlPlane.single()
    path = Path(path).absolute()
    text = control.agree(lambda: _read_manifest_text(path), catch=ShardError)
    m = parse_manifest(text, path)
    wanted = _wanted_meshes(meshes, decode_mesh, prefill_mesh)
    check_against_run(m, control.size, wanted, ranks)
    coords = control.coords(m["rank_grid"])

    def check_own_file():
        # every rank sees rank 0's manifest (a node-local shard set has one per node)
        if not control.is_root and _read_manifest_text(path) != text:
            raise ShardError(
                f"shard set {path}: its {MANIFEST_NAME} differs from rank 0's (another "
                "conversion?); convert again"
            )
        problem = check_rank_file(path, m, coords, verify)
        if problem:
            raise ShardError(f"shard set {path} is damaged: {problem}")

    control.agree(check_own_file, on="all", catch=ShardError)
    return ShardSet(path, m, coords)
