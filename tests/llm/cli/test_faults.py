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
from faultcase import assert_one_error, changed, run, snapshot
from goldens import FIXTURES

from llm.storage.convert import convert
from llm.storage.shards import MANIFEST_NAME, file_sha256, rank_file_name, read_manifest

MODEL = FIXTURES / "tiny-llama-gqa"


@pytest.fixture(scope="module")
def r11(tmp_path_factory):
    """A 1-rank shard set of tiny-llama-gqa on a 2x2 mesh (copied by the tests that edit it)."""
    out = tmp_path_factory.mktemp("faults") / "r11"
    convert(out, str(MODEL), ranks=(1, 1), meshes={"decode": (2, 2)}, progress=False)
    return out


def _convert_args(out, *extra):
    return ["convert", MODEL, "--out", out, "--decode-mesh", "2x2", "--ranks", "1x1", "-q", *extra]


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
    p, _ = run(_convert_args(out, "--force"))  # 1x2 -> 1x1: rank000x001.h5 goes away
    assert p.returncode == 0, p.stderr
    assert sorted(x.name for x in out.iterdir()) == sorted(
        [MANIFEST_NAME, rank_file_name((0, 0)), "tokenizer.json", "generation_config.json"]
    )
    assert sorted(x.name for x in tmp_path.iterdir()) == ["shards"]  # no .tmp-/.old- left
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
    "srun-none": (
        {
            "SLURM_STEP_NUM_TASKS": "4",
            "SLURM_NTASKS": "4",
            "SLURM_STEP_ID": "0",
            "SLURM_PROCID": "0",
        },
        ["srun started 4 tasks", "srun --mpi=pmix"],
    ),
    "srun-old": (
        {"SLURM_NTASKS": "4", "SLURM_STEP_ID": "0"},
        ["SLURM_NTASKS=4", "srun --mpi=pmix"],
    ),
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
    assert changed(before, snapshot(tmp_path, MODEL)) == []  # nothing published
    p, dt = run(["info", "--mesh", "2x2"], env=env, module="meshrt")
    assert_one_error(p, dt, *phrases)


def test_single_task_launch_still_runs(tmp_path):
    p, _ = run(
        ["info", "--mesh", "2x2"],
        module="meshrt",
        env={"SLURM_STEP_NUM_TASKS": "1", "SLURM_NTASKS": "1", "SLURM_PROCID": "0"},
    )
    assert p.returncode == 0, p.stderr


# ----------------------------------------------------------------------------------------------
# 8. file safety: rank files hold only their own data; index paths stay inside the model
# ----------------------------------------------------------------------------------------------


def _restamp(shards: Path, fname: str) -> None:
    """Update the manifest's size and sha256 of an edited rank file (as a forger would)."""
    m = json.loads((shards / MANIFEST_NAME).read_text())
    m["files"][fname].update(
        bytes=(shards / fname).stat().st_size, sha256=file_sha256(shards / fname)
    )
    (shards / MANIFEST_NAME).write_text(json.dumps(m))


def _forge(shards: Path, secret: Path, how: str) -> None:
    fname = rank_file_name((0, 0))
    with h5py.File(shards / fname, "r+") as f:
        name = "decode/embed"
        real = f[name][()]
        del f[name]
        secret.write_bytes(np.arange(real.size, dtype=real.dtype).tobytes())
        if how == "external":
            f.create_dataset(
                name, shape=real.shape, dtype=real.dtype, external=[(str(secret), 0, real.nbytes)]
            )
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
    p, dt = run(["generate", "--model", shards, "--prompt-ids", "1,2,3", "--max-new-tokens", "2"])
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
        json.dumps({"metadata": {}, "weight_map": {n: target for n in names}})
    )
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
    for path, host, pid in (
        (dead, socket.gethostname(), _dead_pid()),
        (foreign, "another-node", 4242),
        (live, socket.gethostname(), os.getpid()),
    ):
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
    job = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llm",
            "convert",
            "random:llama-100m",
            "--out",
            str(out),
            "--decode-mesh",
            "4x4",
            "-q",
        ],
        cwd=ROOT,
        env=ENV,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
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


# ----------------------------------------------------------------------------------------------
# 3 and 4. bad values: one error line, exit 2, before any model loads
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def damaged(tmp_path_factory, r11):
    """A shard set whose rank file is corrupt: any error about the arguments proves they were
    checked before the model was opened."""
    out = tmp_path_factory.mktemp("damaged") / "shards"
    shutil.copytree(r11, out)
    path = out / rank_file_name((0, 0))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return out


BAD_GENERATE = {
    "temperature": (["--temperature", "-1"], ["--temperature", "-1 must be >= 0"]),
    "top-p-high": (["--top-p", "1.5"], ["--top-p", "(0, 1]"]),
    "top-p-zero": (["--top-p", "0"], ["--top-p", "(0, 1]"]),
    "top-k": (["--top-k", "-3"], ["--top-k", "-3 must be >= 0"]),
    "temperature-nan": (["--temperature", "nan"], ["--temperature", "not a finite number"]),
    "ids-not-numbers": (["--prompt-ids", "1,two"], ["--prompt-ids", "'two' is not a token id"]),
    "ids-out-of-vocab": (
        ["--prompt-ids", "1,157"],
        ["token id 157 is outside the vocabulary", "0..156"],
    ),
    "stop-out-of-vocab": (["--prompt-ids", "1", "--stop", "999"], ["--stop", "999"]),
    "prompt-file-missing": (
        ["--prompt-file", "/nonexistent/prompt.txt"],
        ["--prompt-file", "No such file"],
    ),
    "allreduce": (["--allreduce", "tree"], ["--allreduce", "invalid choice"]),
    "seed": (["--prompt-ids", "1", "--seed", "-1"], ["--seed"]),
}


@pytest.mark.parametrize("case", list(BAD_GENERATE))
def test_bad_generate_values_fail_before_the_model_loads(case, damaged):
    extra, phrases = BAD_GENERATE[case]
    if "--prompt-ids" not in extra and "--prompt-file" not in extra:
        extra = ["--prompt-ids", "1,2"] + extra
    before = snapshot(damaged)
    p, dt = run(["generate", "--model", damaged, "--max-new-tokens", "2", *extra])
    line = assert_one_error(p, dt, *phrases, within=15)
    assert "corrupt" not in line
    assert changed(before, snapshot(damaged)) == []


def test_prompt_file_that_is_not_utf8(tmp_path, damaged):
    bad = tmp_path / "prompt.txt"
    bad.write_bytes(b"\xff\xfe caf\xe9")
    p, dt = run(["generate", "--model", damaged, "--prompt-file", bad])
    assert_one_error(p, dt, "--prompt-file", "not UTF-8 text", within=15)


@pytest.mark.parametrize(
    "field, value, phrase",
    [
        ("hidden_act", "gelu_new", "hidden_act 'gelu_new' is not supported"),
        (
            "rope_parameters",
            {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0},
            "rope type 'yarn' is not supported",
        ),
    ],
)
def test_unsupported_model_features_fail_clearly(field, value, phrase, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(MODEL, model)
    config = json.loads((model / "config.json").read_text())
    config[field] = value
    (model / "config.json").write_text(json.dumps(config))
    before = snapshot(tmp_path, MODEL)
    p, dt = run(["generate", "--model", model, "--prompt-ids", "1,2"])
    assert_one_error(p, dt, phrase)
    p, dt = run(["convert", model, "--out", tmp_path / "out", "--decode-mesh", "2x2"])
    assert_one_error(p, dt, phrase)
    p, dt = run(["plan", "--model", model])
    assert_one_error(p, dt, phrase)
    assert changed(before, snapshot(tmp_path, MODEL)) == []


BAD_BENCH = {
    "size-zero": (["gemv", "--size", "0"], ["--size", "0 must be >= 1"]),
    "size-negative": (["gemm", "--size", "-5"], ["--size", "-5 must be >= 1"]),
    "repeat-zero": (["gemm", "--repeat", "0"], ["--repeat", "0 must be >= 1"]),
    "warmup-negative": (["gemv", "--warmup", "-1"], ["--warmup"]),
    "algo": (["gemv", "--algo", "kree"], ["--algo 'kree'", "ktree (meshgemv), pipeline, ring"]),
    "gemm-algo": (["gemm", "--algo", "meshgemv"], ["--algo 'meshgemv'", "meshgemm"]),
    "sides": (["model", "--sides", "60,0"], ["--sides", "'0'"]),
    "device": (["gemv", "--device", "wse9"], ["--device wse9", "unknown device"]),
}


@pytest.mark.parametrize("case", list(BAD_BENCH))
def test_bad_bench_values_fail_at_parse_time(case):
    args, phrases = BAD_BENCH[case]
    p, dt = run(["bench", *args], module="meshrt")
    assert_one_error(p, dt, *phrases, within=10)


BAD_LLM_BENCH = {
    "layers": (["--layers", "9"], ["--layers 9", "tiny-llama has 2 layers"]),
    "prompt": (["--prompt-len", "600"], ["600 + --new-tokens 2 = 602 tokens", "context of 512"]),
}


@pytest.mark.parametrize("case", list(BAD_LLM_BENCH))
def test_llm_bench_refuses_what_the_preset_cannot_run(case):
    # before placing anything: more layers than the model has, or a request beyond its context
    args, phrases = BAD_LLM_BENCH[case]
    base = ["bench", "--preset", "tiny-llama", "--decode-mesh", "2x2", "--new-tokens", "2"]
    p, dt = run([*base, *args])
    assert_one_error(p, dt, *phrases, within=20)


def test_estimate_sweep_of_a_zero_side_and_info_mesh_without_verify(r11):
    p, dt = run(["estimate", "--preset", "llama3-8b", "--sweep", "0,420"])
    assert_one_error(p, dt, "--sweep '0,420'", "positive sides", within=20)
    # a mesh given to info is a job to check against, which only --verify does
    p, dt = run(["info", str(r11), "--decode-mesh", "3x3"])
    assert_one_error(p, dt, "--decode-mesh", "add --verify", within=20)


def test_meshgemv_is_an_alias_of_ktree(tmp_path):
    out = tmp_path / "gemv.json"
    p, _ = run(
        [
            "bench",
            "gemv",
            "--algo",
            "meshgemv,ktree",
            "--mesh",
            "2x2",
            "--size",
            "8",
            "--repeat",
            "1",
            "--warmup",
            "0",
            "--json",
            out,
        ],
        module="meshrt",
    )
    assert p.returncode == 0, p.stderr
    assert [r["algo"] for r in json.loads(out.read_text())] == ["ktree"]
    runs = {}
    for algo in ("meshgemv", "ktree"):
        p, _ = run(
            [
                "generate",
                "--model",
                MODEL,
                "--prompt-ids",
                "1,5,9",
                "--max-new-tokens",
                "4",
                "--allreduce",
                algo,
                "--json",
                "--ignore-eos",
            ]
        )
        assert p.returncode == 0, p.stderr
        runs[algo] = json.loads(p.stdout)["new_ids"]
    assert runs["meshgemv"] == runs["ktree"]


# ----------------------------------------------------------------------------------------------
# 5. a KV cache too small: refused before prefill for the prompt, kv_full for new tokens
# ----------------------------------------------------------------------------------------------


def _generate_json(*extra, model=MODEL):
    p, _ = run(
        [
            "generate",
            "--model",
            model,
            "--prompt-ids",
            "1,5,9",
            "--max-new-tokens",
            "8",
            "--ignore-eos",
            "--json",
            *extra,
        ]
    )
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout), p


@pytest.mark.parametrize("policy", ["shift", "concat"])
def test_kv_full_keeps_the_tokens_made(policy):
    full, _ = _generate_json("--kv-policy", policy)
    assert full["stopped_by"] == "max_new_tokens" and len(full["new_ids"]) == 8
    short, p = _generate_json("--kv-policy", policy, "--kv-capacity", "2")
    assert short["stopped_by"] == "kv_full", short
    assert 0 < len(short["new_ids"]) < 8
    assert short["new_ids"] == full["new_ids"][: len(short["new_ids"])]
    assert "stopped_by kv_full" in p.stderr  # told before prefill
    p, _ = run(
        [
            "generate",
            "--model",
            MODEL,
            "--prompt-ids",
            "1,5,9",
            "--max-new-tokens",
            "8",
            "--ignore-eos",
            "--kv-policy",
            policy,
            "--kv-capacity",
            "2",
        ]
    )
    assert p.returncode == 0 and "(kv_full)" in p.stderr, p.stderr
    assert p.stdout.strip() == short["text"].strip()  # the streamed text is kept


def test_prompt_larger_than_the_kv_cache_is_refused_before_prefill():
    p, dt = run(["generate", "--model", MODEL, "--prompt-ids", "1,2,3,4,5", "--kv-capacity", "1"])
    assert_one_error(p, dt, "--kv-capacity 1 is too small for the prompt", "5 tokens")


# ----------------------------------------------------------------------------------------------
# 6. --prompt-ids without a tokenizer; 3. SentencePiece tokenizer.model
# ----------------------------------------------------------------------------------------------


def test_prompt_ids_without_a_tokenizer():
    qwen = FIXTURES / "tiny-qwen2"  # no tokenizer.json, vocabulary of 151
    out, _ = _generate_json(model=qwen)
    assert out["text"] is None and len(out["new_ids"]) == 8
    p, _ = run(
        [
            "generate",
            "--model",
            qwen,
            "--prompt-ids",
            "1,5,9",
            "--max-new-tokens",
            "8",
            "--ignore-eos",
            "-q",
        ]
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == [str(t) for t in out["new_ids"]]
    p, dt = run(["generate", "--model", qwen, "--prompt", "hello"])
    assert_one_error(p, dt, "too small for the byte-level tokenizer", "--prompt-ids")


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    """tiny-llama-gqa with a SentencePiece tokenizer.model instead of its tokenizer.json."""
    spm = pytest.importorskip("sentencepiece")
    base = tmp_path_factory.mktemp("spm")
    model = base / "model"
    shutil.copytree(MODEL, model)
    (model / "tokenizer.json").unlink()
    text = base / "corpus.txt"
    text.write_text(
        "\n".join(
            [
                "the mesh passes the cache to its neighbours",
                "every core holds a tile of the weights",
                "tokens stream out as they are made",
            ]
            * 20
        )
    )
    spm.SentencePieceTrainer.train(
        input=str(text),
        model_prefix=str(model / "tokenizer"),
        vocab_size=60,
        model_type="bpe",
        bos_id=1,
        eos_id=2,
        unk_id=0,
        pad_id=-1,
        minloglevel=2,
    )
    return model


def test_sentencepiece_tokenizer_model(spm_model):
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_model / "tokenizer.model"))
    ids = [1] + sp.encode("the mesh passes")
    p, _ = run(
        [
            "generate",
            "--model",
            spm_model,
            "--prompt",
            "the mesh passes",
            "--json",
            "--max-new-tokens",
            "4",
            "--ignore-eos",
        ]
    )
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["prompt_ids"] == ids
    assert out["text"] == sp.decode([t for t in out["new_ids"] if t not in (1, 2) and t < 60])


def test_sentencepiece_without_the_package_fails_clearly(spm_model, tmp_path):
    blocker = tmp_path / "block" / "sentencepiece"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('not installed')\n")
    env = {"PYTHONPATH": str(blocker.parent)}
    p, dt = run(["generate", "--model", spm_model, "--prompt", "the mesh"], env=env)
    assert_one_error(
        p, dt, "SentencePiece tokenizer.model but no tokenizer.json", "pip install sentencepiece"
    )
    p, _ = run(
        [
            "generate",
            "--model",
            spm_model,
            "--prompt-ids",
            "1,5",
            "-q",
            "--max-new-tokens",
            "2",
            "--ignore-eos",
        ],
        env=env,
    )
    assert p.returncode == 0 and len(p.stdout.split()) == 2, p.stderr  # ids in, ids out


# ----------------------------------------------------------------------------------------------
# 9. small ones
# ----------------------------------------------------------------------------------------------


def test_directory_that_is_neither_shards_nor_model(tmp_path):
    (tmp_path / "README.md").write_text("hello")
    before = snapshot(tmp_path)
    p, dt = run(["generate", "--model", tmp_path, "--prompt-ids", "1"])
    assert_one_error(
        p, dt, "is not a shard set (no manifest.json) or an HF model directory (no config.json)"
    )
    assert changed(before, snapshot(tmp_path)) == []


def test_padding_beyond_the_data_warns(tmp_path):
    p, _ = run(["convert", MODEL, "--out", tmp_path / "out", "--decode-mesh", "32x32", "-q"])
    assert p.returncode == 0, p.stderr
    assert "decode mesh 32x32: the mesh is large for this model: zero padding exceeds" in p.stderr
    p, _ = run(["convert", MODEL, "--out", tmp_path / "ok", "--decode-mesh", "2x2", "-q"])
    assert p.returncode == 0 and "padding" not in p.stderr, p.stderr


def test_closed_stdout_ends_quietly(r11):
    import os

    read_end, write_end = os.pipe()
    os.close(read_end)  # as `| head` does once it has enough
    try:
        p, dt = run(["info", r11], stdout=write_end)
    finally:
        os.close(write_end)
    assert p.returncode == 141 and dt < 20
    assert "Traceback" not in p.stderr and "BrokenPipeError" not in p.stderr, p.stderr


# ----------------------------------------------------------------------------------------------
# 5. non-finite logits end with one error line (the decode engine names the layer)
# ----------------------------------------------------------------------------------------------


def nan_model(base):
    """tiny-llama-gqa whose layer 1 MLP output projection is all NaN."""
    from safetensors.numpy import load_file, save_file

    model = base / "nan-model"
    shutil.copytree(MODEL, model)
    weights = load_file(str(model / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj.weight"
    weights[name] = np.full_like(weights[name], np.nan)
    save_file(weights, str(model / "model.safetensors"))
    return model


@pytest.mark.parametrize("temperature", ["0", "0.7"], ids=["greedy", "sampled"])
def test_nan_weights_end_with_one_error_line(temperature, tmp_path):
    model = nan_model(tmp_path)
    before = snapshot(tmp_path, MODEL)
    p, dt = run(
        [
            "generate",
            "--model",
            model,
            "--prompt-ids",
            "1,5,9",
            "--max-new-tokens",
            "3",
            "--temperature",
            temperature,
        ]
    )
    assert_one_error(p, dt, "non-finite", "layer 1")
    assert changed(before, snapshot(tmp_path, MODEL)) == []


def test_singleton_under_the_mpi4py_runner_ends_without_an_abort(tmp_path):
    env = {"SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "1"}
    p, dt = run(
        ["-m", "mpi4py", "-m", "llm", *_convert_args(tmp_path / "out")], env=env, module=None
    )
    assert_one_error(p, dt, "srun --mpi=pmix")
    assert "abort" not in p.stderr.lower() and not (tmp_path / "out").exists()
