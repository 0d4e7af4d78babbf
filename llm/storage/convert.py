"""Converting a model into per-rank shards: HF checkpoints, GGUF files, or random weights.

The converter runs tile producers (one per phase) over the model's HF-named tensors and writes
each rank's block of every global tile array into that rank's file (:mod:`llm.storage.shards`).
Under
``mpiexec -n N`` the ranks convert in parallel: every process produces every tensor (one at a
time, from the lazy source) and keeps only the blocks of the rank files it writes. A conversion
may also run on fewer processes than the rank grid it converts for (e.g. one process on a login
node for a 64-rank job): rank file ``k`` is written by process ``k % nprocs``.

Each phase's weight placement is a producer in :data:`llm.placement.phase_tiles.PHASE_TILES`,
``producer(PhaseLayout, weights) -> iterator of (name, global tiles [Py, Px, ...])``.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from meshrt.mesh import MeshError, MeshLayout, default_rank_grid, grid_coords
from meshrt.runtime import ControlPlane

from ..modeling.config import ConfigError, ModelConfig, preset
from ..placement.layout import LAYOUT_VERSION, PhaseLayout, mesh_pair
from ..placement.phase_tiles import PHASE_TILES
from . import node_local as node_local_files
from .checkpoint import CheckpointError, RandomWeights, load_checkpoint
from .shard_writer import FileRecord, ShardWriter, prepare_target, publish, remove_temporary
from .shards import FORMAT_NAME, FORMAT_VERSION, STORAGE_DTYPES, ShardError, content_hash, grid_text

RANDOM_PREFIX = "random:"
DEFAULT_DECODE_MESH = (8, 8)
#: Files of an HF model directory copied into the shard set, so that it stands alone.
COPIED_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "tokenizer.model",
    "generation_config.json",
)

# ----------------------------------------------------------------------------------------------
# sources
# ----------------------------------------------------------------------------------------------


@dataclass
class ModelSource:
    """What a conversion reads: the config, lazy HF-named float32 weights, a label for the
    manifest, and the files that travel with the shards (tokenizer, chat template, ...).

    Attributes
    ----------
    config : ModelConfig
    weights : Mapping
        ``HF name -> f32 array``, read or made on each access.
    label : str
    files : dict
        ``{file name: Path to copy, or bytes to write}`` for the shard directory.
    """

    config: ModelConfig
    weights: Mapping
    label: str
    files: dict = field(default_factory=dict)

    def write_files(self, directory) -> None:
        """Copy / write :attr:`files` into ``directory``."""
        for name, content in self.files.items():
            if isinstance(content, bytes):
                (Path(directory) / name).write_bytes(content)
            else:
                shutil.copyfile(content, Path(directory) / name)


def open_source(
    source: str, seed: int = 0, layers: int | None = None, max_context: int | None = None
) -> ModelSource:
    """The model named by ``source``: an HF model directory, a GGUF file, or ``random:PRESET``.

    Parameters
    ----------
    source : str
        Path of a directory with ``config.json`` and safetensors; path of a ``.gguf`` file
        (:mod:`llm.storage.gguf_source`; its tokenizer and chat template go with the shards); or
        ``random:NAME`` for random weights with the shapes of preset ``NAME`` (see
        :func:`llm.modeling.config.preset`).
    seed : int
        Seed of random weights.
    layers : int, optional
        Keep only the first ``layers`` decoder layers (benchmarks of big models).
    max_context : int, optional
        Shorter context than the model's ``max_position_embeddings``.
    """
    if str(source).startswith(RANDOM_PREFIX):
        name = str(source)[len(RANDOM_PREFIX) :]
        config = preset(name)
        if max_context is not None:
            if not 0 < max_context <= config.max_position_embeddings:
                raise ConfigError(
                    f"max_context={max_context} must be in 1..{config.max_position_embeddings}"
                )
            config = config.replace(max_position_embeddings=int(max_context))
        label = f"random preset {config.name} seed {int(seed)}"
        config, label = _truncate(config, layers, label)
        return ModelSource(config, RandomWeights(config, seed), label)
    path = Path(source)
    if path.is_file() and (path.suffix == ".gguf" or _is_gguf(path)):
        return _gguf_source(path, layers, max_context)
    if not path.is_dir():
        raise ConfigError(
            f"source {source!r} is neither a model directory, a .gguf file nor "
            f"'{RANDOM_PREFIX}PRESET' (e.g. {RANDOM_PREFIX}llama-100m)"
        )
    config, weights = load_checkpoint(path, lazy=True, max_context=max_context)
    config, label = _truncate(config, layers, path.absolute().name)
    files = {n: path / n for n in COPIED_FILES if (path / n).is_file()}
    if (path / "tokenizer.json").exists():  # a broken one must not travel with the shards
        from ..text.tokenizer import TokenizerError, load_tokenizer

        try:
            load_tokenizer(path, config)
        except TokenizerError as e:
            raise ConfigError(str(e)) from None
    return ModelSource(config, weights, label, files)


def check_chat_template(files: dict) -> None:
    """The chat template among a source's travelling ``files``, if any, must compile and render
    a first turn within its bounds (:mod:`llm.text.chat_template`); ``ShardError`` if not, so
    that no shard set carries a template that hangs or floods every chat. Without jinja2 (the
    ``chat`` extra) there is nothing to check with, and the template travels unchecked."""
    from ..text.chat_template import ChatTemplate, ChatTemplateError, NoChatTemplate

    if not {"chat_template.jinja", "tokenizer_config.json"} & set(files):
        return
    try:
        import jinja2  # noqa: F401
    except ImportError:
        return
    try:
        ChatTemplate.from_files(files).check()
    except NoChatTemplate:
        return
    except ChatTemplateError as e:
        raise ShardError(f"the model's chat template is unusable: {e}") from None


def _is_gguf(path: Path) -> bool:
    from .gguf_source import is_gguf

    return is_gguf(path)


def _gguf_source(path: Path, layers, max_context) -> ModelSource:
    from collections import Counter

    from .gguf_source import GGUFWeights, load_gguf
    from .gguf_tokenizer import tokenizer_files

    config, weights, f = load_gguf(path, max_context)
    kinds = Counter(weights.types().values())
    label = (
        f"{path.name} (GGUF {', '.join(f'{n} {k}' for k, n in kinds.most_common())} "
        "tensors, de-quantized)"
    )
    config, label = _truncate(config, layers, label)
    if layers is not None:
        weights = GGUFWeights(f, config)  # only the kept layers
    return ModelSource(config, weights, label, tokenizer_files(f))


def load_source(
    source: str, seed: int = 0, layers: int | None = None, max_context: int | None = None
) -> tuple[ModelConfig, Mapping, str]:
    """``(config, weights, label)`` of :func:`open_source` (without the travelling files)."""
    src = open_source(source, seed, layers, max_context)
    return src.config, src.weights, src.label


def _truncate(config: ModelConfig, layers: int | None, label: str) -> tuple[ModelConfig, str]:
    if layers is None or layers == config.num_layers:
        return config, label
    if not 0 < layers <= config.num_layers:
        raise ConfigError(f"--layers {layers}: the model has {config.num_layers} layers")
    return (
        config.replace(num_layers=int(layers)),
        f"{label} (first {layers} of {config.num_layers} layers)",
    )


# ----------------------------------------------------------------------------------------------
# meshes
# ----------------------------------------------------------------------------------------------


def check_phases(meshes: Mapping) -> None:
    """Raise :class:`ShardError` for a phase without a tile producer."""
    for phase in meshes:
        if phase not in PHASE_TILES:
            raise ShardError(
                f"no tile placement for phase {phase!r}; phases available: {', '.join(PHASE_TILES)}"
            )


def choose_rank_grid(nranks: int, meshes: Mapping) -> tuple[int, int]:
    """The squarest ``Ry x Rx = nranks`` grid dividing every phase's mesh."""
    py = px = 0
    for mesh in meshes.values():
        py, px = math.gcd(py, mesh[0]), math.gcd(px, mesh[1])
    return default_rank_grid(nranks, py, px)


def phase_layouts(meshes: Mapping, grid: tuple[int, int]) -> dict[str, MeshLayout]:
    """Validated :class:`MeshLayout` per phase (raises ``MeshError`` naming valid sizes)."""
    return {phase: MeshLayout(int(mesh[0]), int(mesh[1]), *grid) for phase, mesh in meshes.items()}


# ----------------------------------------------------------------------------------------------
# progress
# ----------------------------------------------------------------------------------------------


class _Progress:
    """A tqdm bar on rank 0 (tensor groups: globals, layer 0, layer 1, ...) plus a plain log line
    every ``every`` tensors, which is what batch logs and Open MPI show."""

    def __init__(
        self, root: bool, total: int, progress: bool | None, log: logging.Logger, every: int
    ):
        from tqdm import tqdm

        disable = True if (not root or progress is False) else (None if progress is None else False)
        self.bar = tqdm(
            total=total,
            unit="layer",
            desc="convert",
            disable=disable,
            mininterval=0.5,
            file=sys.stderr,
            dynamic_ncols=True,
        )
        self.live = root and not self.bar.disable
        self.root, self.log, self.every = root, log, max(1, int(every))
        self.count, self.nbytes, self.t0 = 0, 0, time.perf_counter()
        self._group: tuple[str, str] | None = None

    def tensor(self, phase: str, name: str, nbytes: int) -> None:
        group = (phase, name.split("/")[0] if "/" in name else "")
        if self._group is not None and group != self._group:
            self.bar.update(1)
        self._group = group
        self.count += 1
        self.nbytes += nbytes
        if self.root and not self.live and self.count % self.every == 0:
            self.log.info(
                f"convert: {self.count} tensors ({phase}/{name}), "
                f"{self.nbytes / 2**20:.1f} MiB written by rank 0, "
                f"{time.perf_counter() - self.t0:.1f} s"
            )

    def close(self) -> None:
        if self._group is not None:
            self.bar.update(1)
        self.bar.close()


# ----------------------------------------------------------------------------------------------
# conversion
# ----------------------------------------------------------------------------------------------


def _write_failure(error: BaseException, rank: int, nprocs: int, tmp: Path) -> str:
    """The one-line message of a failure to write this rank's files."""
    where = f" on rank {rank}" if nprocs > 1 else ""
    if isinstance(error, ShardError):
        return str(error)
    errno = getattr(error, "errno", None)
    what = os.strerror(errno) if errno else " ".join(str(error).split())
    return (
        f"writing the shards failed{where} ({what}); nothing was written: free space "
        f"in {tmp.parent} (or choose another --out) and convert again"
    )


def padding_note(config: ModelConfig, playout: PhaseLayout) -> str | None:
    """A warning when a mesh is so large that zero padding outweighs the model's data."""
    c = config
    real = {
        "hidden": c.hidden_size,
        "ffn": c.intermediate_size,
        "vocab": c.vocab_size,
        "kv": c.num_kv_heads * c.head_dim,
        "q": c.num_heads * c.head_dim,
    }
    over = [
        f"{k} {v} -> {getattr(playout, k)}" for k, v in real.items() if getattr(playout, k) > 2 * v
    ]
    if not over:
        return None
    return (
        f"the mesh is large for this model: zero padding exceeds the data ({', '.join(over)}); "
        "memory and time go mostly to padding: a smaller --decode-mesh/--prefill-mesh fits "
        "better"
    )


def _count(n: int) -> str:
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return str(n)


def convert(
    out_dir,
    source: str,
    ranks: tuple[int, int] | None = None,
    meshes: Mapping | None = None,
    dtype: str = "float32",
    control: ControlPlane | None = None,
    force: bool = False,
    progress: bool | None = None,
    seed: int = 0,
    layers: int | None = None,
    max_context: int | None = None,
    log: logging.Logger | None = None,
    log_every: int = 20,
    delete_other_files: bool = False,
    node_local: bool = False,
) -> dict:
    """Convert ``source`` into a shard set at ``out_dir`` (collective over ``control``).

    Parameters
    ----------
    out_dir : path
        Target directory; written as ``<out_dir>.tmp-<pid>`` and renamed when complete.
    source : str
        HF model directory, GGUF file or ``random:PRESET`` (see :func:`open_source`).
    ranks : (int, int), optional
        Rank grid the shards are for; default: the squarest grid of the running process count
        that divides every mesh. The running process count must not exceed ``Ry * Rx``.
    meshes : dict, optional
        ``{phase: (Py, Px)}``; default ``{"decode": (8, 8)}``.
    dtype : {"float32", "float16", "bfloat16"}
        Storage dtype (compute is float32; 16-bit storage halves the files).
    control : ControlPlane, optional
        The converting processes; by default one process.
    force : bool
        Replace an existing shard set at ``out_dir`` (only a shard set, and only the files
        its manifest lists; see :func:`llm.storage.shard_writer.replaceable_files`).
    progress : bool or None
        tqdm bar on rank 0: ``None`` = when stderr is a terminal, ``True`` = always,
        ``False`` = never.
    seed, layers, max_context
        See :func:`open_source`.
    log : logging.Logger, optional
        Where rank 0 reports progress (``logging.getLogger("llm")`` by default).
    log_every : int
        A plain progress line every this many tensors when no live bar is shown.
    delete_other_files : bool
        With ``force``: also delete files in ``out_dir`` that its manifest does not list.
    node_local : bool
        ``out_dir`` is on each node's own disk: one process per rank file, placed as the ranks
        that will read them; each node gets the files of the ranks it hosts and the manifest
        (see :mod:`llm.storage.node_local`).

    Returns
    -------
    dict
        The manifest (on every rank).

    Raises
    ------
    ShardError, ConfigError, MeshError, CheckpointError
        Bad input, detected identically on every rank before anything is written; or a
        failure to write (disk full), reported on every rank after the temporary directory
        was removed. Any other exception is a bug: it is raised on its rank after that rank
        removed the temporary directory.
    """
    log = log or logging.getLogger("llm")
    control = control or ControlPlane.single()
    nprocs, rank = control.size, control.rank
    meshes = {
        phase: tuple(int(v) for v in mesh)
        for phase, mesh in (meshes or {"decode": DEFAULT_DECODE_MESH}).items()
    }
    if "decode" not in meshes:
        raise ShardError("a shard set needs decode tiles: give a decode mesh")
    check_phases(meshes)
    if dtype not in STORAGE_DTYPES:
        raise ShardError(
            f"storage dtype {dtype!r} is not supported; use one of {', '.join(STORAGE_DTYPES)}"
        )
    grid = mesh_pair(ranks) if ranks is not None else choose_rank_grid(nprocs, meshes)
    layouts = phase_layouts(meshes, grid)
    nfiles = grid[0] * grid[1]
    if nprocs > nfiles:
        raise MeshError(
            f"{nprocs} processes convert for a {grid_text(grid)} rank grid of only "
            f"{nfiles} rank files: run with at most {nfiles} processes or pass "
            f"--ranks for a grid of {nprocs} ranks"
        )
    if node_local and nprocs != nfiles:
        raise MeshError(
            f"--node-local writes each rank's file on the node of that rank: run it with as "
            f"many processes as the rank grid {grid_text(grid)} has ranks ({nfiles}), not {nprocs}"
        )

    def open_own_source():
        try:
            return open_source(source, seed, layers, max_context)
        except (ConfigError, CheckpointError, NotImplementedError) as e:
            raise ShardError(str(e)) from None

    # the source must read alike on every rank (shared FS)
    src = control.agree(open_own_source, on="all", catch=ShardError)
    control.agree(lambda: check_chat_template(src.files), catch=ShardError)  # rank 0 renders
    config, weights, label = src.config, src.weights, src.label
    copied = list(src.files)

    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    created = control.bcast(created)
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "layout_version": LAYOUT_VERSION,
        "config": config.to_dict(),
        "parameters": config.num_parameters(),
        "source": label,
        "created": created,
        "dtype": dtype,
        "rank_grid": list(grid),
        "copied_files": copied,
        "phases": {},
    }

    if node_local:
        where = node_local_files.nodes(control)
        tmp = node_local_files.prepare_target(out_dir, control, where, force, delete_other_files)
    else:
        tmp = prepare_target(out_dir, control, force, delete_other_files)
    if rank == 0:
        for phase, lay in layouts.items():
            note = padding_note(config, PhaseLayout(config, lay.py, lay.px))
            if note:
                log.warning(f"{phase} mesh {grid_text((lay.py, lay.px))}: {note}")
        log.info(
            f"convert {label} -> {out_dir}: {_count(config.num_parameters())} parameters, "
            f"rank grid {grid_text(grid)}, "
            + ", ".join(f"{ph} mesh {grid_text(m)}" for ph, m in meshes.items())
            + f", {dtype}"
            + (f", {nprocs} processes" if nprocs > 1 else "")
        )
    mine = [grid_coords(k, grid) for k in range(nfiles) if k % nprocs == rank]
    writer, records, failure = None, {}, None
    bar = _Progress(rank == 0, len(meshes) * (config.num_layers + 1), progress, log, log_every)
    t0 = time.perf_counter()
    try:
        writer = ShardWriter(tmp, grid, mine, dtype)
        for phase, lay in layouts.items():
            playout = PhaseLayout(config, lay.py, lay.px)
            tensors = {}
            for name, tiles in PHASE_TILES[phase](playout, weights):
                before = writer.bytes_written
                writer.add(phase, name, tiles, (lay.py, lay.px))
                tensors[name] = [int(s) for s in tiles.shape]
                bar.tensor(phase, name, writer.bytes_written - before)
                del tiles
            manifest["phases"][phase] = {
                "mesh": [lay.py, lay.px],
                "layout": playout.describe(),
                "tensors": tensors,
            }
        manifest["content_hash"] = content_hash(manifest)
        records = writer.finish(manifest["content_hash"])
    except (ShardError, OSError) as e:  # expected: disk full, float16 overflow, ...
        failure = _write_failure(e, rank, nprocs, tmp)
    except BaseException:  # a bug or Ctrl-C: this rank cleans up, then ends
        if writer is not None:
            writer.abort()
        remove_temporary(tmp)
        raise
    finally:
        if failure is not None and writer is not None:
            writer.abort()
        bar.close()

    # control plane: every file's checksum (or its failure) to rank 0, which writes the
    # manifest and renames; on any failure it removes the temporary directory instead
    gathered = control.gather((manifest.get("content_hash"), records, failure))

    def publish_on_root() -> dict:
        assert gathered is not None, "publish_on_root runs on rank 0, which gathered every rank"
        try:
            failures = [f for _, _, f in gathered if f]
            if failures:
                raise ShardError(
                    failures[0]
                    + (f" (and {len(failures) - 1} more rank(s))" if len(failures) > 1 else "")
                )
            if len({h for h, _, _ in gathered}) != 1:
                raise ShardError(
                    "ranks produced different tensor lists or shapes (the tile "
                    "producers are not deterministic); nothing was written"
                )
            files: dict[str, FileRecord] = {}
            for _, recs, _ in gathered:
                files.update(recs)
            manifest["files"] = dict(sorted(files.items()))
            src.write_files(tmp)  # tokenizer and HF config travel with the shards
            publish(tmp, out_dir, manifest, delete_other_files, force)
            return manifest
        except ShardError:
            remove_temporary(tmp)
            raise
        except OSError as e:
            remove_temporary(tmp)
            raise ShardError(_write_failure(e, 0, 1, tmp)) from None
        except BaseException:
            remove_temporary(tmp)
            raise

    if node_local:
        payload = node_local_files.finish(
            control,
            where,
            gathered,
            manifest,
            tmp,
            out_dir,
            src.write_files,
            delete_other_files,
            force,
        )
    else:
        payload = control.agree(publish_on_root, catch=ShardError)
    if rank == 0:
        total = sum(r["bytes"] for r in payload["files"].values())
        log.info(
            f"wrote {Path(out_dir)}: {len(payload['files'])} rank files, "
            f"{total / 2**20:.1f} MiB, in {time.perf_counter() - t0:.1f} s"
        )
    return payload
