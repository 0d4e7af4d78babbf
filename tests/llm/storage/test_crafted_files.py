"""Crafted and damaged input files, read by the library: safetensors headers (checked as the
format's own library checks them), config sizes and values, tokenizer files, and a shard set that
appears while a conversion runs."""

import copy
import json
import math
import struct
from pathlib import Path

import pytest
from goldens import FIXTURES

from llm.modeling.config import ConfigError, ModelConfig
from llm.storage.checkpoint import CheckpointError, load_checkpoint, read_header
from llm.storage.shard_writer import publish
from llm.storage.shards import ShardError
from llm.text.tokenizer import TokenizerError, load_tokenizer

MODEL = FIXTURES / "tiny-llama-gqa"


# ----------------------------------------------------------------------------------------------
# safetensors headers
# ----------------------------------------------------------------------------------------------


def _parts() -> tuple[dict, bytes]:
    raw = (MODEL / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_safetensors(path: Path, header, data: bytes, text: bytes | None = None) -> Path:
    """A safetensors file with the given header (or raw header text) and data section."""
    text = json.dumps(header).encode() if text is None else text
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def _by_offset(header: dict) -> list:
    names = [k for k in header if k != "__metadata__"]
    return sorted(names, key=lambda k: header[k]["data_offsets"])


def _shift4(h, data):
    first = _by_offset(h)[0]
    b, e = h[first]["data_offsets"]
    h[first]["data_offsets"] = [b + 4, e + 4]
    return h, data


def _overlap(h, data):
    a, b = _by_offset(h)[:2]
    h[b]["data_offsets"] = [h[a]["data_offsets"][1] - 4, h[b]["data_offsets"][1] - 4]
    return h, data


def _set(key, value):
    def edit(h, data):
        h[_by_offset(h)[0]][key] = value(h[_by_offset(h)[0]][key])
        return h, data

    return edit


CRAFTED = {
    "shifted-by-4": _shift4,
    "overlapping": _overlap,
    "offsets-as-text": _set("data_offsets", lambda v: [str(x) for x in v]),
    "offsets-as-floats": _set("data_offsets", lambda v: [float(x) for x in v]),
    "three-offsets": _set("data_offsets", lambda v: v + [v[1]]),
    "offsets-reversed": _set("data_offsets", lambda v: v[::-1]),
    "offsets-not-a-list": _set("data_offsets", lambda v: {"begin": v[0], "end": v[1]}),
    "negative-shape": _set("shape", lambda v: [-v[0]] + v[1:]),
    "shape-too-big": _set("shape", lambda v: [v[0] * 2] + v[1:]),
    "unknown-dtype": _set("dtype", lambda v: "F8_Z"),
    "entry-not-an-object": lambda h, d: ({**h, _by_offset(h)[0]: [1, 2]}, d),
    "metadata-not-text": lambda h, d: ({**h, "__metadata__": {"format": 5}}, d),
    "header-a-list": lambda h, d: ([h], d),
    "truncated-data": lambda h, d: (h, d[:-4]),
    "trailing-bytes": lambda h, d: (h, d + b"\0" * 8),
}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_crafted_header_is_refused_as_the_safetensors_library_refuses_it(case, tmp_path):
    from safetensors import safe_open

    header, data = _parts()
    crafted = CRAFTED[case](copy.deepcopy(header), data)
    path = write_safetensors(tmp_path / "x.safetensors", *crafted)
    with pytest.raises(Exception):  # noqa: B017, PT011 - the library raises its own type
        with safe_open(str(path), framework="np") as f:
            [f.get_tensor(k) for k in f.keys()]
    with pytest.raises(CheckpointError, match=str(path)):
        read_header(path)


def test_a_tensor_name_given_twice_is_refused(tmp_path):
    header, data = _parts()
    first = _by_offset(header)[0]
    text = json.dumps(header)[:-1] + f", {json.dumps(first)}: {json.dumps(header[first])}}}"
    path = write_safetensors(tmp_path / "x.safetensors", None, data, text.encode())
    with pytest.raises(CheckpointError, match="twice"):
        read_header(path)


def test_the_fixture_and_files_written_here_still_read(tmp_path):
    read_header(MODEL / "model.safetensors")
    header, data = _parts()
    path = write_safetensors(tmp_path / "x.safetensors", header, data)
    assert read_header(path)[0] == header


# ----------------------------------------------------------------------------------------------
# configs: sizes, whole numbers, finite values, JSON objects
# ----------------------------------------------------------------------------------------------


def _config(**changes) -> dict:
    d = json.loads((MODEL / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            d.pop(key, None)
        else:
            d[key] = value
    return d


BAD_CONFIGS = {
    "layers-1e9": ({"num_hidden_layers": 10**9}, "num_layers=1000000000 is beyond"),
    "hidden-huge": ({"hidden_size": 1 << 24, "head_dim": 8}, "hidden_size=16777216 is beyond"),
    "vocab-huge": ({"vocab_size": 1 << 40}, "vocab_size=1099511627776 is beyond"),
    "layers-negative": ({"num_hidden_layers": -3}, "num_layers must be a positive integer"),
    "kv-heads-zero": ({"num_key_value_heads": 0}, "num_kv_heads must be a positive integer"),
    "heads-zero": ({"num_attention_heads": 0, "head_dim": None}, "not divisible"),
    "heads-fractional": ({"num_attention_heads": 6.5}, "num_attention_heads must be a whole"),
    "kv-heads-fractional": ({"num_key_value_heads": 1.5}, "num_key_value_heads must be a whole"),
    "layers-as-text": ({"num_hidden_layers": "3"}, "num_hidden_layers must be a whole number"),
    "layers-true": ({"num_hidden_layers": True}, "num_hidden_layers must be a whole number"),
    "context-zero": ({"max_position_embeddings": 0}, "max_position_embeddings must be positive"),
    "eps-nan": ({"rms_norm_eps": math.nan}, "rms_norm_eps must be a finite number"),
    "eps-text": ({"rms_norm_eps": "1e-5"}, "rms_norm_eps must be a number"),
    "theta-inf": (
        {"rope_parameters": {"rope_type": "default", "rope_theta": math.inf}},
        "rope_theta must be a finite number",
    ),
    "rope-factor-nan": (
        {
            "rope_parameters": dict(
                _config()["rope_parameters"], factor=math.nan, rope_theta=10000.0
            )
        },
        "factor must be a finite number",
    ),
    "rope-factor-negative": (
        {"rope_parameters": dict(_config()["rope_parameters"], factor=-8.0)},
        "factor must be positive",
    ),
    "rope-parameters-list": ({"rope_parameters": [1, 2]}, "rope_parameters must be a JSON object"),
    "eos-fractional": ({"eos_token_id": 2.5}, "token ids must be integers"),
    "bos-text": ({"bos_token_id": "1"}, "token ids must be integers"),
    "tie-as-text": ({"tie_word_embeddings": "false"}, "tie_word_embeddings must be true or false"),
    "bias-as-text": ({"attention_bias": "no"}, "attention_bias must be true or false"),
    "sliding-as-text": (
        {"model_type": "qwen2", "use_sliding_window": "false", "sliding_window": 4},
        "use_sliding_window must be true or false",
    ),
    "model-type-a-list": ({"model_type": ["llama"]}, "model_type must be a name"),
    "architectures-nested": (
        {"model_type": None, "architectures": [["LlamaForCausalLM"]]},
        "model_type None is not supported",
    ),
    "dtype-a-list": ({"dtype": ["bfloat16"]}, "dtype must be a name"),
    "window-fractional": (
        {"model_type": "mistral", "sliding_window": 100.5},
        "sliding_window must be a whole number",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_values_are_refused_not_changed(case):
    changes, phrase = BAD_CONFIGS[case]
    with pytest.raises(ConfigError, match=phrase.replace("(", r"\(")):
        ModelConfig.from_hf_dict(_config(**changes))


def test_whole_floats_are_still_read_as_ints():
    c = ModelConfig.from_hf_dict(_config(num_hidden_layers=3.0, num_attention_heads=6.0))
    assert c.num_layers == 3 and isinstance(c.num_layers, int) and c.num_heads == 6


@pytest.mark.parametrize("text", ["[1, 2]", '"llama"', "\xff\xfe"])
def test_config_json_that_is_not_an_object(text, tmp_path):
    (tmp_path / "config.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(ConfigError, match="config.json"):
        ModelConfig.from_json(tmp_path)


def test_more_layers_than_the_checkpoint_holds_is_refused_before_listing_them(tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(MODEL, model)
    (model / "config.json").write_text(json.dumps(_config(num_hidden_layers=16000)))
    with pytest.raises(CheckpointError, match="needs 144003 tensors .16000 layers. but the"):
        load_checkpoint(model, lazy=True)


# ----------------------------------------------------------------------------------------------
# tokenizer.json
# ----------------------------------------------------------------------------------------------


def _tokenizer_with_extra_id(text: str) -> str:
    d = json.loads(text)
    d["added_tokens"].append(dict(d["added_tokens"][0], id=157, content="<extra>"))
    return json.dumps(d)


BAD_TOKENIZERS = {
    "truncated": (lambda t: t[:500], "not valid JSON"),
    "empty": (lambda t: "", "not valid JSON"),
    "a-list": (lambda t: "[1, 2, 3]", 'a JSON object with a "model"'),
    "no-model": (lambda t: json.dumps({"version": "1.0"}), 'a JSON object with a "model"'),
    "wrong-model": (lambda t: json.dumps({"model": {"type": "BPE", "vocab": 5}}), "usable"),
    "beyond-vocab": (_tokenizer_with_extra_id, "token ids up to 157, beyond the model's"),
}


@pytest.mark.parametrize("case", list(BAD_TOKENIZERS))
def test_bad_tokenizer_json_is_one_tokenizer_error(case, tmp_path):
    edit, phrase = BAD_TOKENIZERS[case]
    (tmp_path / "tokenizer.json").write_text(edit((MODEL / "tokenizer.json").read_text()))
    config = ModelConfig.from_json(MODEL)
    with pytest.raises(TokenizerError, match=phrase):
        load_tokenizer(tmp_path, config)


def test_binary_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(TokenizerError, match="not UTF-8 text"):
        load_tokenizer(tmp_path, ModelConfig.from_json(MODEL))


# ----------------------------------------------------------------------------------------------
# publishing: a set that appeared during the run is never replaced without force
# ----------------------------------------------------------------------------------------------


def _finished_tmp(path: Path) -> dict:
    path.mkdir()
    (path / "rank000x000.h5").write_bytes(b"new")
    return {"files": {"rank000x000.h5": {"rank": [0, 0], "bytes": 3, "sha256": "x"}}}


def test_publish_without_force_keeps_a_set_that_appeared_meanwhile(tmp_path):
    out, tmp = tmp_path / "out", tmp_path / "out.tmp-1"
    manifest = _finished_tmp(tmp)
    out.mkdir()  # another conversion finished first
    (out / "manifest.json").write_text(json.dumps({"format": "waferllm-mpi-shards", "files": {}}))
    with pytest.raises(ShardError, match="already exists: pass --force"):
        publish(tmp, out, manifest)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"]
    # an empty directory made meanwhile is not replaced either
    (out / "manifest.json").unlink()
    with pytest.raises(ShardError, match="already exists"):
        publish(tmp, out, manifest)
    out.rmdir()
    assert publish(tmp, out, manifest) == out
    assert (out / "rank000x000.h5").read_bytes() == b"new"


def test_rename_never_replaces_an_existing_directory(tmp_path):
    from llm.storage.shard_writer import _rename_no_replace

    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()  # empty: os.rename would replace it silently
    with pytest.raises(FileExistsError):
        _rename_no_replace(src, dst)
    assert src.is_dir() and dst.is_dir()
    dst.rmdir()
    _rename_no_replace(src, dst)
    assert dst.is_dir() and not src.exists()
