"""The fault matrix of crafted files, batch outputs and concurrent conversions (round three).

Every case runs the real CLI as a subprocess with a timeout and asserts the exit code, the one
``error:`` line, the wall time (no hang) and that no file outside the intended output changed.
The library-level cases of the same families are in ``tests/llm/storage/test_crafted_files.py``.
"""

import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from faultcase import ENV, ROOT, assert_one_error, changed, needs_mpiexec, run, snapshot
from goldens import FIXTURES

from llm.storage.convert import convert

MODEL = FIXTURES / "tiny-llama-gqa"
#: Address space of a case that must fail before anything is sized by the config: a run that
#: allocates per layer instead hits it within seconds (MemoryError) instead of filling the box.
LIMIT_BYTES = 3 << 30


def _limited():
    resource.setrlimit(resource.RLIMIT_AS, (LIMIT_BYTES, LIMIT_BYTES))


def _model(tmp_path: Path, **config) -> Path:
    """A copy of the fixture with ``config.json`` keys changed (``None`` removes one)."""
    model = tmp_path / "model"
    if not model.exists():
        shutil.copytree(MODEL, model)
    d = json.loads((MODEL / "config.json").read_text())
    for key, value in config.items():
        if value is None:
            d.pop(key, None)
        else:
            d[key] = value
    (model / "config.json").write_text(json.dumps(d))
    return model


def _generate(model, *extra, n=None, preexec_fn=None):
    args = ["generate", "--model", model, "--prompt-ids", "1,5,9", "--max-new-tokens", "2"]
    return run([*args, "--decode-mesh", "2x2", *extra], n=n, preexec_fn=preexec_fn)


def _convert(model, out, *extra, n=None, preexec_fn=None):
    args = ["convert", model, "--out", out, "--decode-mesh", "2x2", "-q", *extra]
    return run(args, n=n, preexec_fn=preexec_fn)


# ----------------------------------------------------------------------------------------------
# 1. absurd sizes: refused from the config and the checkpoint's contents, before any allocation
# ----------------------------------------------------------------------------------------------

SIZES = {
    "layers-1e9": ({"num_hidden_layers": 1_000_000_000}, "num_layers=1000000000 is beyond"),
    "layers-16000": (
        {"num_hidden_layers": 16000},
        "needs 144003 tensors (16000 layers) but the checkpoint holds 30 (tensors of 3 layers)",
    ),
    "hidden-1e9": ({"hidden_size": 10**9}, "hidden_size=1000000000 is beyond"),
    "hidden-2e20": (
        {"hidden_size": 1 << 20, "intermediate_size": 1 << 22},
        "wrong shapes (e.g. model.embed_tokens.weight: (157, 48) != expected (157, 1048576)",
    ),
    "vocab-2e40": ({"vocab_size": 1 << 40}, "vocab_size=1099511627776 is beyond"),
    "heads-1e8": ({"num_attention_heads": 10**8}, "num_heads=100000000 is beyond"),
    "context-1e12": ({"max_position_embeddings": 10**12}, "max_position_embeddings=10"),
    "layers-negative": ({"num_hidden_layers": -2}, "num_layers must be a positive integer"),
}


@pytest.mark.parametrize("case", list(SIZES))
def test_absurd_sizes_are_refused_fast_and_small(case, tmp_path):
    changes, phrase = SIZES[case]
    model = _model(tmp_path, **changes)
    before = snapshot(tmp_path, MODEL)
    p, dt = _generate(model, preexec_fn=_limited)
    assert_one_error(p, dt, phrase, within=15)
    p, dt = _convert(model, tmp_path / "out", preexec_fn=_limited)
    assert_one_error(p, dt, phrase, within=15)
    assert changed(before, snapshot(tmp_path, MODEL)) == []


GGUF_SIZES = {
    "block-count-1e9": (b"llama.block_count", 10**9, "num_layers=1000000000 is beyond"),
    "block-count-16000": (b"llama.block_count", 16000, "needs 144002 tensors (16000 layers)"),
    "embedding-1e9": (b"llama.embedding_length", 10**9, "hidden_size=1000000000 is beyond"),
    "heads-0": (b"llama.attention.head_count", 0, "num_heads must be a positive integer"),
}


@pytest.mark.parametrize("case", list(GGUF_SIZES))
def test_absurd_sizes_in_a_gguf_file(case, tmp_path):
    pytest.importorskip("gguf")
    from gguf_fixture import write_tiny_gguf

    key, value, phrase = GGUF_SIZES[case]
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    data = bytearray(path.read_bytes())
    at = data.find(key) + len(key)
    assert struct.unpack("<I", data[at : at + 4]) == (4,)  # a uint32 value follows
    data[at + 4 : at + 8] = struct.pack("<I", value)
    path.write_bytes(bytes(data))
    p, dt = _convert(path, tmp_path / "out", preexec_fn=_limited)
    assert_one_error(p, dt, "tiny.gguf", phrase, within=15)
    assert not (tmp_path / "out").exists()


@needs_mpiexec
def test_absurd_sizes_on_two_ranks_are_one_line(tmp_path):
    model = _model(tmp_path, num_hidden_layers=16000)
    p, dt = _generate(model, n=2, preexec_fn=_limited)
    assert_one_error(p, dt, "needs 144003 tensors", within=30)
    p, dt = _convert(model, tmp_path / "out", "--ranks", "1x2", n=2, preexec_fn=_limited)
    assert_one_error(p, dt, "needs 144003 tensors", within=30)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# 8. values that used to change silently, or fail only after loading
# ----------------------------------------------------------------------------------------------

VALUES = {
    "heads-fractional": ({"num_attention_heads": 6.5}, "num_attention_heads must be a whole"),
    "kv-heads-fractional": ({"num_key_value_heads": 2.5}, "num_key_value_heads must be a whole"),
    "layers-text": ({"num_hidden_layers": "3"}, "num_hidden_layers must be a whole number"),
    "context-zero": ({"max_position_embeddings": 0}, "max_position_embeddings must be positive"),
    "eps-nan": ({"rms_norm_eps": float("nan")}, "rms_norm_eps must be a finite number"),
    "theta-infinite": (
        {"rope_parameters": {"rope_type": "default", "rope_theta": float("inf")}},
        "rope_theta must be a finite number",
    ),
    "rope-factor-nan": (
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "factor": float("nan"),
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
                "rope_theta": 10000.0,
            }
        },
        "rope_scaling factor must be a finite number",
    ),
    "eos-fractional": ({"eos_token_id": 2.5}, "token ids must be integers"),
    "tie-as-text": ({"tie_word_embeddings": "false"}, "tie_word_embeddings must be true or false"),
    "model-type-a-list": ({"model_type": ["llama"]}, "model_type must be a name"),
}


@pytest.mark.parametrize("case", list(VALUES))
def test_config_values_are_refused_not_changed(case, tmp_path):
    changes, phrase = VALUES[case]
    model = _model(tmp_path, **changes)
    before = snapshot(tmp_path, MODEL)
    p, dt = _generate(model)
    assert_one_error(p, dt, phrase, within=15)
    p, dt = _convert(model, tmp_path / "out")
    assert_one_error(p, dt, phrase, within=15)
    assert changed(before, snapshot(tmp_path, MODEL)) == []


@pytest.mark.parametrize("text", ["[1, 2]", '"a string"', "null"])
def test_config_json_that_is_not_an_object(text, tmp_path):
    model = _model(tmp_path)
    (model / "config.json").write_text(text)
    p, dt = _generate(model)
    assert_one_error(p, dt, "config.json must hold a JSON object", within=15)
    p, dt = _convert(model, tmp_path / "out")
    assert_one_error(p, dt, "config.json must hold a JSON object", within=15)
    p, dt = run(["plan", "--model", model])
    assert_one_error(p, dt, "config.json must hold a JSON object", within=15)


# ----------------------------------------------------------------------------------------------
# 3. safetensors headers: checked as the format's own library checks them
# ----------------------------------------------------------------------------------------------


def _rewrite_header(model: Path, edit) -> None:
    path = model / "model.safetensors"
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8 : 8 + n]), raw[8 + n :]
    header, data = edit(header, data)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def _first(header):
    names = [k for k in header if k != "__metadata__"]
    return sorted(names, key=lambda k: header[k]["data_offsets"])


def _shift(h, d):
    name = _first(h)[0]
    h[name]["data_offsets"] = [x + 4 for x in h[name]["data_offsets"]]
    return h, d


def _overlap(h, d):
    a, b = _first(h)[:2]
    h[b]["data_offsets"] = [x - 4 for x in h[b]["data_offsets"]]
    return h, d


def _offsets_text(h, d):
    name = _first(h)[0]
    h[name]["data_offsets"] = [str(x) for x in h[name]["data_offsets"]]
    return h, d


HEADERS = {
    "shifted-by-4": (_shift, "the offsets are not contiguous"),
    "overlapping": (_overlap, "overlaps the one before it"),
    "offsets-as-text": (_offsets_text, "not two non-negative integers"),
    "header-a-list": (lambda h, d: ([h], d), "header must be a JSON object, not a list"),
    "truncated": (lambda h, d: (h, d[: len(d) // 2]), "truncated?"),
}


@pytest.mark.parametrize("case", list(HEADERS))
def test_crafted_safetensors_headers_are_refused(case, tmp_path):
    edit, phrase = HEADERS[case]
    model = _model(tmp_path)
    _rewrite_header(model, edit)
    before = snapshot(tmp_path, MODEL)
    p, dt = _generate(model)
    assert_one_error(p, dt, "model.safetensors", phrase, within=15)
    p, dt = _convert(model, tmp_path / "out")
    assert_one_error(p, dt, "model.safetensors", phrase, within=15)
    assert changed(before, snapshot(tmp_path, MODEL)) == []


def _index(text: bytes):
    def build(model: Path) -> None:
        (model / "model.safetensors").rename(model / "part-1.safetensors")
        (model / "model.safetensors.index.json").write_bytes(text)

    return build


def _tokenizer_directory(model: Path) -> None:
    (model / "tokenizer.json").unlink()
    (model / "tokenizer.json").mkdir()


MODEL_FILES = {
    "safetensors-5-bytes": (
        lambda m: (m / "model.safetensors").write_bytes(b"\x08\0\0\0\0"),
        "model.safetensors: too short to be a safetensors file",
    ),
    "header-longer-than-file": (
        lambda m: (m / "model.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + b"{}"),
        "header length 1099511627776 exceeds the file size 10",
    ),
    "index-a-list": (_index(b"[1]"), "not a valid safetensors index"),
    "index-map-a-list": (
        _index(b'{"weight_map": []}'),
        "not a valid safetensors index (weight_map is not a JSON object)",
    ),
    "index-binary": (_index(b'{"weight_map": {"a": "\xff"}}'), "not a valid safetensors index"),
    "index-names-a-missing-tensor": (
        _index(b'{"weight_map": {"x": "part-1.safetensors"}}'),
        "puts 'x' in part-1.safetensors, which lacks it",
    ),
    "tokenizer-a-directory": (_tokenizer_directory, "tokenizer.json is not a usable"),
}


@pytest.mark.parametrize("case", list(MODEL_FILES))
def test_more_damaged_model_files(case, tmp_path):
    build, phrase = MODEL_FILES[case]
    model = _model(tmp_path)
    build(model)
    before = snapshot(tmp_path, MODEL)
    p, dt = _generate(model)
    assert_one_error(p, dt, phrase, within=15)
    p, dt = _convert(model, tmp_path / "out")
    assert_one_error(p, dt, phrase, within=15)
    assert changed(before, snapshot(tmp_path, MODEL)) == []


@pytest.mark.parametrize("forged", [False, True], ids=["plain", "manifest-restamped"])
def test_truncated_rank_file(forged, tmp_path):
    from llm.storage.shards import MANIFEST_NAME, file_sha256

    out = tmp_path / "shards"
    convert(out, str(MODEL), ranks=(1, 1), meshes={"decode": (2, 2)}, progress=False)
    rank_file = out / "rank000x000.h5"
    with open(rank_file, "r+b") as f:
        f.truncate(rank_file.stat().st_size // 2)
    if forged:
        m = json.loads((out / MANIFEST_NAME).read_text())
        m["files"][rank_file.name].update(
            bytes=rank_file.stat().st_size, sha256=file_sha256(rank_file)
        )
        (out / MANIFEST_NAME).write_text(json.dumps(m))
    p, dt = run(["generate", "--model", out, "--prompt-ids", "1,5", "--no-verify"])
    phrase = "cannot be opened as HDF5" if forged else "the file is truncated or was replaced"
    assert_one_error(p, dt, f"shard set {out} is damaged", "rank000x000.h5", phrase, within=15)


FORGED_MANIFESTS = {
    "layers-1e9": ({"num_layers": 10**9}, "num_layers=1000000000 is beyond"),
    "heads-fractional": ({"num_heads": 6.5}, "num_heads must be a positive integer"),
    "theta-nan": ({"rope_theta": float("nan")}, "rope_theta must be a positive finite number"),
    "eps-text": ({"rms_norm_eps": "1e-5"}, "rms_norm_eps must be a number"),
}


@pytest.mark.parametrize("case", list(FORGED_MANIFESTS))
def test_shard_manifest_config_restamped_by_a_forger(case, tmp_path):
    """The manifest's content hash recomputed, as a forger would: the config is still checked
    before anything is sized by it."""
    from llm.storage.shards import MANIFEST_NAME, content_hash

    changes, phrase = FORGED_MANIFESTS[case]
    out = tmp_path / "shards"
    convert(out, str(MODEL), ranks=(1, 1), meshes={"decode": (2, 2)}, progress=False)
    m = json.loads((out / MANIFEST_NAME).read_text())
    m["config"].update(changes)
    m["content_hash"] = content_hash(
        {k: v for k, v in m.items() if k not in ("files", "content_hash")}
    )
    (out / MANIFEST_NAME).write_text(json.dumps(m))
    p, dt = run(["generate", "--model", out, "--prompt-ids", "1,5"], preexec_fn=_limited)
    assert_one_error(p, dt, "model config is not readable", phrase, within=15)


# ----------------------------------------------------------------------------------------------
# 4. tokenizer.json: one error line, and convert does not copy a broken one
# ----------------------------------------------------------------------------------------------


def _extra_id(text):
    d = json.loads(text)
    d["added_tokens"].append(dict(d["added_tokens"][0], id=157, content="<extra>"))
    return json.dumps(d)


TOKENIZERS = {
    "truncated": (lambda t: t[:500], "not valid JSON"),
    "a-list": (lambda t: "[]", 'a JSON object with a "model" object'),
    "wrong-structure": (lambda t: json.dumps({"model": {"type": "BPE", "vocab": 7}}), "usable"),
    "binary": (lambda t: "\x00\x01\x02\xff", "not UTF-8 text"),
    "beyond-vocab": (_extra_id, "token ids up to 157, beyond the model's vocabulary (0..156)"),
}


@pytest.mark.parametrize("case", list(TOKENIZERS))
def test_broken_tokenizer_is_one_error_and_is_not_converted(case, tmp_path):
    edit, phrase = TOKENIZERS[case]
    model = _model(tmp_path)
    text = edit((MODEL / "tokenizer.json").read_text())
    (model / "tokenizer.json").write_bytes(text.encode("latin-1" if case == "binary" else "utf-8"))
    before = snapshot(tmp_path, MODEL)
    p, dt = _generate(model)  # token ids need no tokenizer, but a broken one is still an error
    assert_one_error(p, dt, "tokenizer.json", phrase, within=15)
    p, dt = _convert(model, tmp_path / "out")
    assert_one_error(p, dt, "tokenizer.json", phrase, within=15)
    assert changed(before, snapshot(tmp_path, MODEL)) == []  # no shard set


@needs_mpiexec
def test_broken_tokenizer_on_two_ranks_is_one_line(tmp_path):
    model = _model(tmp_path)
    (model / "tokenizer.json").write_text((MODEL / "tokenizer.json").read_text()[:300])
    p, dt = _generate(model, n=2)
    assert_one_error(p, dt, "tokenizer.json", "not valid JSON")


# ----------------------------------------------------------------------------------------------
# 5. two conversions into one --out, neither with --force
# ----------------------------------------------------------------------------------------------


def _start_convert(out: Path) -> subprocess.Popen:
    """The tiny fixture converted in the background (about a second)."""
    return subprocess.Popen(
        [sys.executable, "-m", "llm", "convert", str(MODEL), "--out", str(out)]
        + ["--decode-mesh", "2x2", "-q"],
        cwd=ROOT,
        env=ENV,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _paused_while_writing(out: Path) -> subprocess.Popen | None:
    """A conversion into ``out`` stopped (SIGSTOP) while it writes its rank files, or ``None``
    if it published before it could be stopped (then ``out`` is removed again)."""
    job = _start_convert(out)
    deadline = time.monotonic() + 60
    while not list(out.parent.glob(f"{out.name}.tmp-*/rank*.h5")):
        if job.poll() is not None or time.monotonic() > deadline:
            break
        time.sleep(0.001)
    job.send_signal(signal.SIGSTOP)
    if job.poll() is None and not out.exists():
        return job
    job.send_signal(signal.SIGCONT)
    job.communicate(timeout=60)
    shutil.rmtree(out, ignore_errors=True)
    return None


def test_a_set_that_appears_during_a_conversion_is_kept(tmp_path):
    out = tmp_path / "out"
    for _ in range(10):  # the writing lasts a few tenths of a second: catch it there
        job = _paused_while_writing(out)
        if job is not None:
            break
    else:
        pytest.skip("the conversion always finished before it could be paused")
    try:
        p, _ = _convert(MODEL, out)  # the other conversion finishes first
        assert p.returncode == 0, p.stderr
        first = snapshot(out)
        job.send_signal(signal.SIGCONT)
        _, stderr = job.communicate(timeout=120)
    finally:
        job.send_signal(signal.SIGCONT)
        job.kill()
        job.wait(timeout=30)
    assert job.returncode == 2, stderr
    lines = [x for x in stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and str(out) in lines[0] and "--force" in lines[0], stderr
    assert snapshot(out) == first  # the finished set is the first one, untouched
    assert sorted(x.name for x in tmp_path.iterdir()) == ["out"]  # no temporary left


def test_two_concurrent_converts_leave_one_whole_set(tmp_path):
    from llm.storage.shards import open_shards

    out = tmp_path / "out"
    jobs = [_start_convert(out) for _ in range(2)]  # they race to publish
    try:
        outcomes = [job.communicate(timeout=300) for job in jobs]
    finally:
        for job in jobs:
            job.kill()
            job.wait(timeout=30)
    codes = sorted(job.returncode for job in jobs)
    assert codes == [0, 2], outcomes
    loser = outcomes[[job.returncode for job in jobs].index(2)][1]
    assert "already exists" in loser or "appeared while" in loser, loser
    assert open_shards(out, verify=True).config.num_layers == 3
    assert sorted(x.name for x in tmp_path.iterdir()) == ["out"]


# ----------------------------------------------------------------------------------------------
# 6 and 7. generate --batch --out: only a results file is appended to, never the input
# ----------------------------------------------------------------------------------------------

REQUEST = json.dumps({"id": "a", "prompt_ids": [1, 5, 9], "max_new_tokens": 2}) + "\n"


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    """A 1-rank shard set whose tokenizer.json is on one line, as ``tokenizers`` saves it."""
    base = tmp_path_factory.mktemp("batch")
    model = base / "model"
    shutil.copytree(MODEL, model)
    tokenizer = json.loads((MODEL / "tokenizer.json").read_text())
    (model / "tokenizer.json").write_text(json.dumps(tokenizer, separators=(",", ":")))
    out = base / "shards"
    convert(out, str(model), ranks=(1, 1), meshes={"decode": (2, 2)}, progress=False)
    return out


def _batch(requests, out, *extra, model=MODEL, n=None, timeout=60):
    args = ["generate", "--model", model, "--decode-mesh", "2x2", "--batch", requests]
    return run([*args, "--out", out, *extra], n=n, timeout=timeout)


def _foreign_out(case: str, tmp_path: Path, shard_set: Path) -> Path:
    """A file that is not a results file; most end without a newline, as a results file does
    whose job was killed while writing."""
    config = json.loads((MODEL / "config.json").read_text())
    if case == "tokenizer-of-a-shard-set":
        return shard_set / "tokenizer.json"
    path = tmp_path / case
    content = {
        "json-config-one-line": json.dumps(config),
        "json-config-indented": json.dumps(config, indent=2),
        "text-one-line": "a note without a newline",
        "text-lines": "line one\nline two, no newline",
        "a-json-list-line": '["id", "line", "new_ids"]\n',
        "results-then-text": json.dumps({"id": 1, "line": 1, "new_ids": []}) + "\nnot a result",
    }.get(case)
    if content is None:
        path.write_bytes(bytes(range(256)))
    else:
        path.write_text(content)
    return path


FOREIGN_OUTS = [
    "json-config-one-line",
    "json-config-indented",
    "text-one-line",
    "text-lines",
    "tokenizer-of-a-shard-set",
    "a-json-list-line",
    "results-then-text",
    "binary",
]


@pytest.mark.parametrize("case", FOREIGN_OUTS)
def test_out_that_is_not_a_results_file_is_refused_and_kept(case, tmp_path, shard_set):
    requests = tmp_path / "req.jsonl"
    requests.write_text(REQUEST)
    out = _foreign_out(case, tmp_path, shard_set)
    before = snapshot(tmp_path, shard_set)
    p, dt = _batch(requests, out)
    assert_one_error(p, dt, f"--out {out}", "is not a result line", "refusing to append")
    assert changed(before, snapshot(tmp_path, shard_set)) == []


@pytest.mark.parametrize("link", ["symlink", "hardlink", "dot-path"])
def test_out_that_is_the_batch_file_under_another_name_is_refused(link, tmp_path):
    requests = tmp_path / "req.jsonl"
    requests.write_text(REQUEST)
    out = tmp_path / "out.jsonl"
    if link == "symlink":
        out.symlink_to(requests)
    elif link == "hardlink":
        os.link(requests, out)
    else:
        out = tmp_path / "." / "sub" / ".." / "req.jsonl"
        (tmp_path / "sub").mkdir()
    before = snapshot(tmp_path)
    p, dt = _batch(requests, out)
    assert_one_error(p, dt, f"--out {out} is the --batch file {requests}")
    assert changed(before, snapshot(tmp_path)) == []


def test_out_directory_and_device_batch_are_one_error_each(tmp_path):
    requests = tmp_path / "req.jsonl"
    requests.write_text(REQUEST)
    p, dt = _batch(requests, tmp_path)
    assert_one_error(p, dt, f"--out {tmp_path} is a directory")
    p, dt = _batch("/dev/zero", tmp_path / "out.jsonl")
    assert_one_error(p, dt, "--batch /dev/zero is not a regular file")
    p, dt = _batch(tmp_path, tmp_path / "out.jsonl")
    assert_one_error(p, dt, f"--batch {tmp_path} is a directory")
    p, dt = _batch(requests, "/dev/null")
    assert_one_error(p, dt, "--out /dev/null is not a regular file")
    zero = tmp_path / "zero.jsonl"
    zero.symlink_to("/dev/zero")
    p, dt = _batch(zero, tmp_path / "out.jsonl")
    assert_one_error(p, dt, f"--batch {zero} is not a regular file")
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    p, dt = _batch(requests, fifo)
    assert_one_error(p, dt, f"--out {fifo} is not a regular file")
    p, dt = _batch(requests, tmp_path / "no-such-dir" / "out.jsonl")
    assert_one_error(p, dt, f"directory {tmp_path / 'no-such-dir'} does not exist")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["out.fifo", "req.jsonl", "zero.jsonl"]


def test_endless_batch_line_through_a_pipe_is_refused(tmp_path):
    fifo = tmp_path / "requests.fifo"
    os.mkfifo(fifo)
    feeder = subprocess.Popen(
        ["sh", "-c", f"head -c 40000000 /dev/zero > {fifo}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        p, dt = _batch(fifo, tmp_path / "out.jsonl", "--strict")
    finally:
        feeder.kill()
        feeder.wait(timeout=30)
    assert_one_error(p, dt, f"{fifo}:1: a line longer than 16 MiB")


def test_non_utf8_batch_line_is_named_and_skipped(tmp_path):
    requests, out = tmp_path / "req.jsonl", tmp_path / "out.jsonl"
    second = json.dumps({"id": "b", "prompt_ids": [1, 7], "max_new_tokens": 2}).encode()
    requests.write_bytes(REQUEST.encode() + b'{"id": "x", "prompt": "caf\xe9"}\n' + second + b"\n")
    p, _ = _batch(requests, out)
    assert p.returncode == 0, p.stderr
    assert f"{requests}:2: not UTF-8 text" in p.stderr and "skipped" in p.stderr
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == ["a", "b"]
    out.unlink()
    p, dt = _batch(requests, out, "--strict")
    assert_one_error(p, dt, f"{requests}:2: not UTF-8 text", "nothing was run")
    assert not out.exists() or out.read_text() == ""


# ----------------------------------------------------------------------------------------------
# 6. resumed batches: sampling settings are stored and compared; SIGTERM says how to resume
# ----------------------------------------------------------------------------------------------


def test_resume_with_other_sampling_settings_is_refused_unless_asked(tmp_path):
    requests, out = tmp_path / "req.jsonl", tmp_path / "out.jsonl"
    lines = [{"id": i, "prompt_ids": [1, 5 + i], "max_new_tokens": 2} for i in range(3)]
    requests.write_text("".join(json.dumps(x) + "\n" for x in lines[:2]))
    p, _ = _batch(requests, out)
    assert p.returncode == 0, p.stderr
    first = out.read_text()
    stored = [json.loads(x)["sampling"] for x in first.splitlines()]
    assert stored == [{"temperature": 0.0, "top_k": 0, "top_p": 1.0, "seed": 0}] * 2
    requests.write_text("".join(json.dumps(x) + "\n" for x in lines))  # one more request
    p, dt = _batch(requests, out, "--temperature", "0.7", "--seed", "5")
    assert_one_error(
        p,
        dt,
        f"--out {out}: 2 finished result(s) were made with other sampling settings",
        "temperature 0.0 there, 0.7 now",
        "seed 0 there, 5 now",
        "--allow-sampling-change",
    )
    assert out.read_text() == first
    p, _ = _batch(requests, out, "--temperature", "0.7", "--seed", "5", "--allow-sampling-change")
    assert p.returncode == 0, p.stderr
    assert "kept (--allow-sampling-change)" in p.stderr
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in records] == [0, 1, 2]
    assert records[2]["sampling"]["temperature"] == 0.7
    # the same settings resume without a word
    p, _ = _batch(requests, out)
    assert p.returncode == 2  # results 0, 1 greedy, 2 sampled: result 2 differs now
    p, _ = _batch(requests, out, "--temperature", "0.7", "--seed", "5")
    assert p.returncode == 2  # and 0, 1 differ the other way


def _long_batch(tmp_path) -> tuple:
    """``(requests, out, count)``: a batch file of 400 short requests, long enough to stop
    while it runs, and where its results go."""
    requests, out, count = tmp_path / "req.jsonl", tmp_path / "out.jsonl", 400
    requests.write_text(
        "".join(
            json.dumps({"id": i, "prompt_ids": [1, 5, 9], "max_new_tokens": 6}) + "\n"
            for i in range(count)
        )
    )
    return requests, out, count


def _sigterm_after_two_results(job, out, wait: float) -> str:
    """SIGTERM to ``job`` once ``out`` holds two results (within ``wait`` seconds); its
    stderr (``""`` when it went to a file)."""
    try:
        deadline = time.monotonic() + wait
        while not (out.exists() and out.read_text().count("\n") >= 2):
            assert job.poll() is None and time.monotonic() < deadline, job.communicate()
            time.sleep(0.01)
        job.send_signal(signal.SIGTERM)
        _, stderr = job.communicate(timeout=60)
    finally:
        job.kill()
        job.wait(timeout=30)
    return stderr or ""


def test_sigterm_stops_a_batch_and_says_how_to_resume(tmp_path):
    requests, out, count = _long_batch(tmp_path)
    cmd = [sys.executable, "-m", "llm", "generate", "--model", str(MODEL), "--decode-mesh", "2x2"]
    job = subprocess.Popen(
        [*cmd, "--batch", str(requests), "--out", str(out)],
        cwd=ROOT,
        env=ENV,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    stderr = _sigterm_after_two_results(job, out, 60)
    assert job.returncode == 143, stderr
    assert "batch stopped by SIGTERM after" in stderr and "run the same command again" in stderr
    assert str(out) in stderr and "Traceback" not in stderr
    done = [json.loads(x)["id"] for x in out.read_text().splitlines()]
    assert 2 <= len(done) < count and done == list(range(len(done)))


# ----------------------------------------------------------------------------------------------
# 8. --device and --groups on generate, chat and bench: one error line before the model loads
# ----------------------------------------------------------------------------------------------

COMMANDS = {
    "generate": ["generate", "--model", MODEL, "--prompt-ids", "1,5", "--decode-mesh", "2x2"],
    "chat": ["chat", "--model", MODEL, "--decode-mesh", "2x2"],
    "bench": ["bench", "--preset", "tiny-llama", "--decode-mesh", "2x2", "--new-tokens", "2"],
}
RUN_OPTIONS = {
    "device-unknown": (["--device", "wse9"], ["--device", "unknown device 'wse9'"]),
    "device-field": (["--device", "wse2:clock_hz=-1"], ["--device", "clock_hz=-1: must be > 0"]),
    "device-name": (["--device", "wse2:nonsense=1"], ["--device", "'nonsense' unknown"]),
    "groups": (["--groups", "3"], ["--groups 3", "decode mesh 2x4", "between 1 and 2"]),
}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("case", list(RUN_OPTIONS))
def test_device_and_groups_are_one_error_line(command, case):
    extra, phrases = RUN_OPTIONS[case]
    args = [str(a) for a in COMMANDS[command]]
    if case == "groups":
        args[args.index("2x2")] = "2x4"
    p, dt = run([*args, *extra])
    assert_one_error(p, dt, *phrases, within=20)


def test_groups_against_a_shard_sets_own_mesh(shard_set):
    p, dt = run(["generate", "--model", shard_set, "--prompt-ids", "1,5", "--groups", "4"])
    assert_one_error(p, dt, "--groups 4", "decode mesh 2x2", within=20)
    p, _ = run(["generate", "--model", shard_set, "--prompt-ids", "1,5", "--groups", "2", "-q"])
    assert p.returncode == 0, p.stderr


@needs_mpiexec
def test_groups_on_two_ranks_is_one_line():
    p, dt = run([*COMMANDS["generate"], "--groups", "5"], n=2)
    assert_one_error(p, dt, "--groups 5", within=30)


# ----------------------------------------------------------------------------------------------
# 8. an empty HOME does not put the model cache in /.cache
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("home", ["", "relative/dir"])
def test_empty_home_is_refused_with_the_fix(home):
    env = {"HOME": home, "WAFERLLM_CACHE": ""}
    p, dt = run(["fetch", "smollm2", "-q"], env=env)
    assert_one_error(p, dt, "HOME is", "WAFERLLM_CACHE=DIR", "--cache-dir", within=20)


@needs_mpiexec
def test_batch_file_checks_on_two_ranks(tmp_path):
    requests = tmp_path / "req.jsonl"
    requests.write_text(REQUEST)
    out = tmp_path / "out.jsonl"
    out.symlink_to(requests)
    before = snapshot(tmp_path)
    p, dt = _batch(requests, out, n=2)
    assert_one_error(p, dt, f"--out {out} is the --batch file")
    assert changed(before, snapshot(tmp_path)) == []
    out.unlink()
    out.write_text("a note, no newline")
    before = snapshot(tmp_path)
    p, dt = _batch(requests, out, n=2)
    assert_one_error(p, dt, f"--out {out}:1 (the last line, cut short) is not a result line")
    assert changed(before, snapshot(tmp_path)) == []


def _children(pid: int) -> list:
    kids = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat_file.parent.name))
    return kids


@needs_mpiexec
def test_sigterm_to_every_rank_stops_a_batch_on_two_ranks(tmp_path):
    """As ``scancel`` does: every task gets SIGTERM; rank 0 says how to resume."""
    from faultcase import MPIEXEC

    requests, out = tmp_path / "req.jsonl", tmp_path / "out.jsonl"
    requests.write_text(
        "".join(
            json.dumps({"id": i, "prompt_ids": [1, 5, 9], "max_new_tokens": 6}) + "\n"
            for i in range(400)
        )
    )
    job = subprocess.Popen(
        [MPIEXEC, "-n", "2", sys.executable, "-m", "mpi4py", "-m", "llm", "generate"]
        + ["--model", str(MODEL), "--decode-mesh", "2x2", "--batch", str(requests)]
        + ["--out", str(out)],
        cwd=ROOT,
        env=ENV,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 90
        while not (out.exists() and out.read_text().count("\n") >= 1):
            assert job.poll() is None and time.monotonic() < deadline, job.communicate()
            time.sleep(0.01)
        ranks = _children(job.pid)
        assert len(ranks) == 2, ranks
        for pid in ranks:
            os.kill(pid, signal.SIGTERM)
        _, stderr = job.communicate(timeout=60)
    finally:
        job.kill()
        job.wait(timeout=30)
    assert job.returncode == 143, stderr
    assert "batch stopped by SIGTERM after" in stderr and "run the same command again" in stderr
    assert stderr.count("batch stopped by SIGTERM") == 1, stderr  # once, through mpiexec
    done = [json.loads(x)["id"] for x in out.read_text().splitlines()]
    assert 1 <= len(done) < 400 and done == list(range(len(done)))


@needs_mpiexec
@pytest.mark.parametrize("stderr_to", ["pipe", "file"])
def test_sigterm_to_mpiexec_stops_a_batch_and_says_how_to_resume(tmp_path, stderr_to):
    """SIGTERM to mpiexec itself (``kill``, ``timeout``): Open MPI ends the job on its own and
    no longer forwards what the ranks write, yet the job says how to resume, once, also into
    a file that mpiexec writes to; and the same command resumes it."""
    from faultcase import MPIEXEC

    requests, out, count = _long_batch(tmp_path)
    cmd = [MPIEXEC, "-n", "2", sys.executable, "-m", "mpi4py", "-m", "llm", "generate"]
    cmd += ["--model", str(MODEL), "--decode-mesh", "2x2", "--batch", str(requests)]
    cmd += ["--out", str(out), "-q"]
    log = tmp_path / "stderr.log"
    with open(log, "w") as log_file:
        job = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=ENV,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE if stderr_to == "pipe" else log_file,
            text=True,
        )
    stderr = _sigterm_after_two_results(job, out, 90)  # to mpiexec (prterun in its place)
    if stderr_to == "file":
        stderr = log.read_text()
    assert job.returncode != 0, stderr
    assert stderr.count("batch stopped by SIGTERM after") == 1, stderr
    assert "run the same command again" in stderr and str(out) in stderr
    assert "Traceback" not in stderr
    stopped = stderr[stderr.index("batch stopped") :]
    assert "MPI_ABORT" not in stopped, stderr  # not written over, nor followed by the report
    done = [json.loads(x)["id"] for x in out.read_text().splitlines()]
    assert 2 <= len(done) < count and done == list(range(len(done)))
    # the same command goes on from there (with the requests cut short, to be quick)
    rest = len(done) + 3
    requests.write_text("".join(requests.read_text().splitlines(keepends=True)[:rest]))
    p = subprocess.run(
        cmd[:-1], cwd=ROOT, env=ENV, stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert f"{len(done)} already in {out}, 3 to run" in p.stderr, p.stderr
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == list(range(rest))
