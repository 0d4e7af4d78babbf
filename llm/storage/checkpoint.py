"""HF safetensors checkpoints read into float32 numpy, without torch; and random weights.

A model directory holds ``config.json`` and either one ``model.safetensors`` or several shards
listed in ``model.safetensors.index.json`` (``{"weight_map": {tensor_name: file_name}}``).
float32 / float16 tensors are read with ``safetensors.numpy``; bfloat16 (which numpy lacks) is
read from the file's own header: the raw ``uint16`` words shifted left by 16 bits are exactly
the float32 values. Tensors are read one at a time, so a large checkpoint need not fit in memory
at once (see :class:`Checkpoint`).

Random weights are made per tensor from ``(seed, tensor name, row block)``, so any rows of any
tensor can be regenerated alone and identically (see :func:`random_tensor`).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from meshrt.precision import bf16_words as f32_to_bf16_words
from meshrt.precision import from_bf16_words as bf16_to_f32

from ..modeling.config import ModelConfig
from ..modeling.weights import CheckpointError, check_weights

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# safetensors dtype name -> bytes per element (the ones an LLM checkpoint may hold).
_ITEMSIZE = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
# dtypes whose rows are read straight from the file (little-endian words)
_ROW_DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "<u2"}
# Buffers some older checkpoints store that carry no weights (recomputed from the config).
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


#: The safetensors library's own limit on the JSON header (bytes).
MAX_HEADER_BYTES = 100_000_000


def read_header(path) -> tuple[dict, int]:
    """Parse the header of one ``.safetensors`` file and check it as the format's own library
    does, against the file size.

    The header is a JSON object; ``__metadata__`` (if present) maps strings to strings; every
    other entry has a known ``dtype``, a ``shape`` of non-negative integers and
    ``data_offsets``, two integers. Sorted by offset, the tensors tile the data section exactly:
    each starts where the previous one ends (the first at 0, the last ending at the file's end),
    and each spans ``dtype size x number of elements`` bytes. Anything else is refused with a
    :class:`CheckpointError` naming the file and the tensor, before any data is read.

    Returns
    -------
    header : dict
        ``name -> {"dtype", "shape", "data_offsets"}`` (plus ``"__metadata__"`` if present).
    data_start : int
        Byte offset of the data section; tensor offsets are relative to it.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: too short to be a safetensors file")
            (n,) = struct.unpack("<Q", prefix)
            if n > size - 8:
                raise CheckpointError(f"{path}: header length {n} exceeds the file size {size}")
            if n > MAX_HEADER_BYTES:
                raise CheckpointError(f"{path}: header of {n} bytes, more than safetensors allows")
            header = json.loads(f.read(n).decode("utf-8"), object_pairs_hook=_unique_keys)
    except FileNotFoundError:
        raise CheckpointError(f"missing checkpoint file {path}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: header is not valid JSON ({e})") from None
    except _NameTwice as e:
        raise CheckpointError(f"{path}: header {e}") from None
    if not isinstance(header, dict):
        raise CheckpointError(
            f"{path}: header must be a JSON object, not a {type(header).__name__}"
        )
    data_start, data_size = 8 + n, size - 8 - n
    meta = header.get("__metadata__")
    if meta is not None and not (
        isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())
    ):
        raise CheckpointError(f"{path}: __metadata__ must map names to strings")
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        spans.append((_span(path, name, info), name))
    end = 0
    for (begin, stop), name in sorted(spans):
        if begin != end:
            what = "overlaps the one before it" if begin < end else "leaves a gap before it"
            raise CheckpointError(
                f"{path}: tensor {name!r} starts at data offset {begin}, which {what} (at "
                f"{end}): the offsets are not contiguous (corrupt or crafted file?)"
            )
        end = stop
    if end != data_size:
        raise CheckpointError(
            f"{path}: the header's tensors cover {end} bytes of data but the file holds "
            f"{data_size} ({'truncated' if end > data_size else 'bytes that no tensor owns'}?)"
        )
    return header, data_start


class _NameTwice(ValueError):
    """A JSON object of a safetensors header gives one key twice."""


def _unique_keys(pairs: list) -> dict:
    """``json`` object hook refusing a key given twice (which would hide one tensor)."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise _NameTwice(f"names {key!r} twice")
        out[key] = value
    return out


def _span(path: Path, name: str, info) -> tuple[int, int]:
    """``(begin, end)`` of one header entry, checked for types and against dtype x shape."""

    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    if not isinstance(info, dict):
        raise CheckpointError(f"{path}: header entry for {name!r} is not a JSON object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str):
        raise CheckpointError(f"{path}: tensor {name!r} has no dtype")
    if dtype not in _ITEMSIZE:
        raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
    if not isinstance(shape, list) or not all(is_int(s) for s in shape):
        raise CheckpointError(
            f"{path}: tensor {name!r} has shape {shape!r}, not a list of non-negative integers"
        )
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(is_int, offsets))):
        raise CheckpointError(
            f"{path}: tensor {name!r} has data_offsets {offsets!r}, not two non-negative integers"
        )
    begin, end = offsets
    count = 1
    for s in shape:
        count *= s
    if end < begin or end - begin != count * _ITEMSIZE[dtype]:
        raise CheckpointError(
            f"{path}: tensor {name!r} ({dtype}{shape}) has data offsets [{begin}, {end}), "
            f"not the {count * _ITEMSIZE[dtype]} bytes its shape needs (corrupt or crafted file?)"
        )
    return begin, end


class SafetensorsFile:
    """One ``.safetensors`` file, read tensor by tensor as float32."""

    def __init__(self, path):
        self.path = Path(path)
        self.header, self.data_start = read_header(self.path)
        self.metadata = self.header.pop("__metadata__", None) or {}

    def names(self) -> list[str]:
        """Tensor names in header order."""
        return list(self.header)

    def dtype(self, name: str) -> str:
        """safetensors dtype string of a tensor (``"F32"``, ``"BF16"``, ...)."""
        return self.header[name]["dtype"]

    def shape(self, name: str) -> tuple:
        """Shape of a tensor."""
        return tuple(self.header[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        """One tensor as a float32 array (a copy, owned by the caller)."""
        info = self.header[name]
        dtype, shape = info["dtype"], tuple(info["shape"])
        if dtype not in _FLOAT_DTYPES:
            raise CheckpointError(
                f"{self.path}: tensor {name!r} has dtype {dtype}, expected a floating-point dtype"
            )
        if dtype == "BF16":
            begin, end = info["data_offsets"]
            words = np.fromfile(
                self.path, dtype="<u2", count=(end - begin) // 2, offset=self.data_start + begin
            )
            return bf16_to_f32(words).reshape(shape)
        from safetensors import safe_open

        with safe_open(str(self.path), framework="np") as f:
            return np.asarray(f.get_tensor(name), dtype=np.float32)

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` (axis 0) of a tensor as float32, read alone from the file."""
        info = self.header[name]
        dtype, shape = info["dtype"], tuple(info["shape"])
        if dtype not in _ROW_DTYPES:
            return self.get(name)[start:stop]
        start, stop, _ = slice(start, stop).indices(shape[0] if shape else 1)
        row = int(np.prod(shape[1:], dtype=np.int64))
        begin = info["data_offsets"][0] + start * row * _ITEMSIZE[dtype]
        words = np.fromfile(
            self.path,
            dtype=_ROW_DTYPES[dtype],
            count=max(stop - start, 0) * row,
            offset=self.data_start + begin,
        )
        vals = bf16_to_f32(words) if dtype == "BF16" else words.astype(np.float32)
        return vals.reshape((max(stop - start, 0),) + shape[1:])


class Checkpoint(Mapping):
    """A model directory as a lazy mapping ``HF tensor name -> f32 array``.

    Each lookup reads that tensor from disk; nothing is cached. Buffers without weights
    (``rotary_emb.inv_freq``) are hidden, and so is ``lm_head.weight`` when the config ties the
    embeddings (HF then uses ``embed_tokens`` for both).

    Parameters
    ----------
    model_dir : path
        Directory with ``config.json`` and the safetensors file(s).
    config : ModelConfig, optional
        Defaults to the directory's ``config.json``.
    """

    def __init__(self, model_dir, config: ModelConfig | None = None):
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise CheckpointError(f"model directory {self.model_dir} does not exist")
        self.config = config if config is not None else ModelConfig.from_json(self.model_dir)
        self._files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, str] = {}
        index = self.model_dir / INDEX_FILE
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
            if not isinstance(weight_map, dict):
                raise CheckpointError(
                    f"{index}: not a valid safetensors index (weight_map is not a JSON object)"
                )
            for fname in set(weight_map.values()):
                if not _inside(fname):
                    raise CheckpointError(
                        f"{index} names {fname!r}, a path outside the model "
                        "directory; refusing to read it"
                    )
        elif (self.model_dir / SINGLE_FILE).exists():
            weight_map = {name: SINGLE_FILE for name in self._file(SINGLE_FILE).names()}
        else:
            files = sorted(p.name for p in self.model_dir.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"no *.safetensors file in {self.model_dir}")
            weight_map = {}
            for fname in files:
                for name in self._file(fname).names():
                    if name in weight_map:
                        raise CheckpointError(
                            f"{name!r} is in both {weight_map[name]} and "
                            f"{fname}; add a {INDEX_FILE} to say which to use"
                        )
                    weight_map[name] = fname
        for name, fname in weight_map.items():
            if name not in self._file(fname).header:
                raise CheckpointError(f"{index.name} puts {name!r} in {fname}, which lacks it")
            if name.endswith(_IGNORED_SUFFIXES):
                continue
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            self._where[name] = fname

    def _file(self, fname: str) -> SafetensorsFile:
        if fname not in self._files:
            self._files[fname] = SafetensorsFile(self.model_dir / fname)
        return self._files[fname]

    def __getitem__(self, name: str) -> np.ndarray:
        return self._file(self._where[name]).get(name)

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def shape(self, name: str) -> tuple:
        """Shape of a tensor, from the header (nothing is read)."""
        return self._file(self._where[name]).shape(name)

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of a tensor as float32; only those bytes are read."""
        return self._file(self._where[name]).rows(name, start, stop)

    def dtype(self, name: str) -> str:
        """Stored safetensors dtype of a tensor."""
        return self._file(self._where[name]).dtype(name)

    def shapes(self) -> dict:
        """Name -> shape of every tensor, from the headers."""
        return {name: self.shape(name) for name in self}


def _inside(fname) -> bool:
    """Whether an index entry names a file inside the model directory (no absolute path, no
    ``..``; symlinks the directory itself holds, as in the HF cache, are the owner's choice)."""
    if not isinstance(fname, str) or not fname or "\0" in fname:
        return False
    parts = fname.replace("\\", "/").split("/")
    return not os.path.isabs(fname) and ".." not in parts


def load_checkpoint(model_dir, lazy: bool = False, max_context: int | None = None):
    """Read an HF model directory.

    Parameters
    ----------
    model_dir : path
        Directory with ``config.json`` and ``model.safetensors`` (or sharded files + index).
    lazy : bool
        Return the :class:`Checkpoint` mapping (reads on access) instead of a dict of arrays.
    max_context : int, optional
        Passed to :meth:`ModelConfig.from_hf_dict`.

    Returns
    -------
    config : ModelConfig
    weights : dict or Checkpoint
        HF tensor name -> f32 array, checked against the config (tied models have no
        ``lm_head.weight``; use :func:`llm.modeling.weights.lm_head_weight`).
    """
    config = ModelConfig.from_json(model_dir, max_context=max_context)
    ckpt = Checkpoint(model_dir, config)
    check_weights(config, ckpt.shapes())
    return config, (ckpt if lazy else {name: ckpt[name] for name in ckpt})


def storage_dtype(ckpt: Checkpoint) -> str:
    """How to hold a checkpoint's weights in memory without changing a value: ``"bfloat16"`` or
    ``"float16"`` when every matrix is stored so, else ``"float32"``."""
    kinds = {ckpt.dtype(name) for name in ckpt if len(ckpt.shape(name)) == 2}
    return {frozenset({"BF16"}): "bfloat16", frozenset({"F16"}): "float16"}.get(
        frozenset(kinds), "float32"
    )


# ---------------------------------------------------------------------- random weights
RANDOM_ROW_BLOCK = 64  # rows drawn from one random stream; any row range can be made alone
RANDOM_STD = 0.02  # std of linear weights, embeddings and biases
NORM_STD = 0.1  # norm weights are 1 + NORM_STD * N(0, 1)


def _name_key(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")


def random_tensor(
    config: ModelConfig,
    name: str,
    seed: int = 0,
    rows: slice | None = None,
    shape: tuple | None = None,
) -> np.ndarray:
    """One random weight tensor, a function of ``(seed, name)`` only.

    Rows (axis 0) come in blocks of :data:`RANDOM_ROW_BLOCK`, each from its own stream seeded by
    ``(seed, hash(name), block)``, so ``random_tensor(..., rows=slice(a, b))`` equals
    ``random_tensor(...)[a:b]`` without making the rest.

    Parameters
    ----------
    config : ModelConfig
        Gives the shape of ``name`` (unless ``shape`` is passed).
    name : str
        HF tensor name.
    seed : int
    rows : slice, optional
        Contiguous row range (step 1) to make.
    shape : tuple, optional
        The full shape, to skip looking it up in ``config.tensor_shapes()``.

    Returns
    -------
    f32[rows, ...]
        Norm weights ``1 + 0.1 N(0, 1)``; everything else ``0.02 N(0, 1)``.
    """
    if shape is None:
        shapes = config.tensor_shapes()
        if name not in shapes:
            raise KeyError(f"{name!r} is not a weight of this {config.family} config")
        shape = shapes[name]
    start, stop, step = (rows or slice(None)).indices(shape[0])
    if step != 1:
        raise ValueError("rows must be a contiguous slice")
    is_norm = name.endswith("norm.weight")
    key = _name_key(name)
    out = np.empty((max(stop - start, 0),) + tuple(shape[1:]), dtype=np.float32)
    for block in range(start // RANDOM_ROW_BLOCK, -(-stop // RANDOM_ROW_BLOCK)):
        b0 = block * RANDOM_ROW_BLOCK
        b1 = min(b0 + RANDOM_ROW_BLOCK, shape[0])
        rng = np.random.default_rng([seed, key, block])
        values = rng.standard_normal((b1 - b0,) + tuple(shape[1:]), dtype=np.float32)
        lo, hi = max(start, b0), min(stop, b1)
        out[lo - start : hi - start] = values[lo - b0 : hi - b0]
    if is_norm:
        out *= np.float32(NORM_STD)
        out += np.float32(1.0)
    else:
        out *= np.float32(RANDOM_STD)
    return out


def random_weights(config: ModelConfig, seed: int = 0) -> dict:
    """All weights of ``config`` from :func:`random_tensor` (HF names -> f32 arrays).

    Holds the whole model in memory: for large presets use :func:`random_tensor` per tensor.
    """
    return {
        name: random_tensor(config, name, seed, shape=shape)
        for name, shape in config.tensor_shapes().items()
    }


class RandomWeights(Mapping):
    """HF-named random weights of a config, each tensor made on access (nothing is kept).

    Tensor ``name`` is :func:`llm.storage.checkpoint.random_tensor` ``(config, name, seed)``, a
    function
    of ``(seed, name)`` only: a model truncated to its first layers holds exactly the first
    layers of the full model, and LLaMA3-8B-sized weights never need to fit in memory at once.
    """

    def __init__(self, config: ModelConfig, seed: int = 0):
        self.config = config
        self.seed = int(seed)
        self._shapes = config.tensor_shapes()

    def __getitem__(self, name: str):
        if name not in self._shapes:
            raise KeyError(name)
        return random_tensor(self.config, name, self.seed, shape=self._shapes[name])

    def shape(self, name: str) -> tuple:
        """Shape of a tensor (nothing is made)."""
        return tuple(self._shapes[name])

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of a tensor, made alone (equal to ``self[name][start:stop]``)."""
        if name not in self._shapes:
            raise KeyError(name)
        return random_tensor(
            self.config, name, self.seed, rows=slice(start, stop), shape=self._shapes[name]
        )

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)


def save_model_dir(path, config: ModelConfig, weights: Mapping, dtype: str = "float32") -> Path:
    """Write an HF-style model directory (``config.json`` + ``model.safetensors``).

    ``dtype`` is ``"float32"``, ``"float16"`` or ``"bfloat16"``. The files are written under
    temporary names and renamed when complete.
    """
    from safetensors.numpy import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    check_weights(config, weights)
    hf = dict(config.to_hf_dict(), torch_dtype=dtype)
    if dtype in ("float32", "float16"):
        arrays = {k: np.ascontiguousarray(v, dtype=dtype) for k, v in weights.items()}
        save_file(arrays, str(path / (SINGLE_FILE + ".tmp")), metadata={"format": "pt"})
    elif dtype == "bfloat16":
        _save_bf16(path / (SINGLE_FILE + ".tmp"), weights)
    else:
        raise ValueError(f"dtype {dtype!r} must be float32, float16 or bfloat16")
    os.replace(path / (SINGLE_FILE + ".tmp"), path / SINGLE_FILE)
    tmp = path / "config.json.tmp"
    tmp.write_text(json.dumps(hf, indent=2) + "\n")
    os.replace(tmp, path / "config.json")
    return path


def _save_bf16(path: Path, weights: Mapping) -> None:
    """A safetensors file of bfloat16 tensors, written from its specification."""
    header: dict[str, dict[str, object]] = {"__metadata__": {"format": "pt"}}
    blobs: list[bytes] = []
    offset = 0
    for name in sorted(weights):
        words = f32_to_bf16_words(np.asarray(weights[name], dtype=np.float32))
        blob = words.astype("<u2").tobytes()
        header[name] = {
            "dtype": "BF16",
            "shape": list(words.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # keep the data section 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for blob in blobs:
            f.write(blob)
