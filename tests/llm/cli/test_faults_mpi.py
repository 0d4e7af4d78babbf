"""The fault matrix at the rank counts where the faults happen: whole ``mpiexec`` jobs.

Each case asserts the exit code, the one ``error:`` line, the wall time (no hang) and that no
file outside the intended output changed. The jobs use the documented launch form
(``python -m mpi4py -m llm``) unless a case is about the form without ``-m mpi4py``.
"""

import json
import shutil

import pytest
from faultcase import (
    PER_RANK_CWD,
    assert_one_error,
    changed,
    error_lines,
    needs_mpiexec,
    run,
    snapshot,
)
from goldens import FIXTURES

pytestmark = needs_mpiexec
MODEL = FIXTURES / "tiny-llama-gqa"

ONLY_SOME_RANKS = """
from meshrt import runtime
def main(argv):
    comm = runtime.world()
    if comm.Get_rank() in (1, 2):
        raise runtime.UsageError("bad input seen by rank %d only" % comm.Get_rank())
    comm.Barrier()      # rank 0 waits for ranks that will never come
runtime.run_main(main)
"""


@pytest.mark.parametrize("safe", [True, False], ids=["mpi4py-runner", "plain"])
def test_usage_error_on_some_ranks_ends_the_job_with_its_message(safe, tmp_path):
    script = tmp_path / "job.py"
    script.write_text(ONLY_SOME_RANKS)
    p, dt = run([script], n=3, module=None, safe=safe, timeout=60)
    assert p.returncode == 2, p.stderr
    errors = [e for e in error_lines(p.stderr) if ": error: bad input seen by rank" in e]
    assert 1 <= len(errors) <= 2 and errors[0].startswith(("rank 1/3", "rank 2/3")), p.stderr
    assert "Traceback" not in p.stderr
    assert dt < 30, f"took {dt:.1f} s"


@pytest.mark.parametrize("safe", [True, False], ids=["mpi4py-runner", "plain"])
def test_usage_error_on_every_rank_prints_once(safe, tmp_path):
    p, dt = run(["info", tmp_path / "nothing-here"], n=4, safe=safe)
    assert_one_error(p, dt, "does not exist")
    assert "MPI_ABORT" not in p.stderr


def test_force_refuses_unlisted_files_on_two_ranks(tmp_path):
    out = tmp_path / "shards"
    args = ["convert", MODEL, "--out", out, "--decode-mesh", "2x2", "-q"]
    p, _ = run(args, n=2)
    assert p.returncode == 0, p.stderr
    (out / "notes.txt").write_text("mine")
    before = snapshot(tmp_path, MODEL)
    p, dt = run(args + ["--force"], n=2)
    assert_one_error(p, dt, "notes.txt", "--delete-other-files")
    assert changed(before, snapshot(tmp_path, MODEL)) == []


SMALL_DISK = """
import resource, runpy, signal, sys
from mpi4py import MPI      # start MPI first: its shared-memory segments are files too
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)       # a write past the limit fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]),) * 2)
sys.argv = ["llm"] + sys.argv[2:]
runpy.run_module("llm", run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("n", [1, 2])
def test_disk_full_during_convert_leaves_nothing(n, tmp_path):
    """Files stop growing past 256 KiB (as on a full disk) while every rank writes."""
    script = tmp_path / "small_disk.py"
    script.write_text(SMALL_DISK)
    out = tmp_path / "out"
    before = snapshot(tmp_path, MODEL)
    p, dt = run(
        [
            script,
            256 << 10,
            "convert",
            "random:tiny-llama",
            "--out",
            out,
            "--decode-mesh",
            "4x4",
            "-q",
        ],
        n=n if n > 1 else None,
        module=None,
    )
    assert_one_error(p, dt, "writing the shards failed", "File too large", "nothing was written")
    assert changed(before, snapshot(tmp_path, MODEL)) == []  # no out, no .tmp- left


def test_model_directory_missing_on_one_rank(tmp_path):
    """No shared filesystem: the source exists only where rank 0 runs."""
    here, there = tmp_path / "node0", tmp_path / "node1"
    here.mkdir(), there.mkdir()
    shutil.copytree(MODEL, here / "model")
    script = tmp_path / "per_rank_cwd.py"
    script.write_text(PER_RANK_CWD)
    before = snapshot(tmp_path, MODEL)
    p, dt = run(
        [
            script,
            here,
            there,
            "convert",
            "model",
            "--out",
            tmp_path / "out",
            "--decode-mesh",
            "2x2",
            "-q",
        ],
        n=2,
        module=None,
    )
    assert_one_error(p, dt, "neither a model directory")
    p, dt = run(
        [
            script,
            here,
            there,
            "generate",
            "--model",
            "model",
            "--prompt-ids",
            "1,2",
            "--max-new-tokens",
            "2",
        ],
        n=2,
        module=None,
    )
    assert_one_error(p, dt, "model")
    assert changed(before, snapshot(tmp_path, MODEL)) == []


def test_ranks_with_different_tokenizers_stop_before_loading(tmp_path):
    """Rank 1's copy of the model has an older tokenizer.json (one merge fewer): it would feed
    other tokens than rank 0 and the ranks would diverge. Every rank stops alike instead."""
    here, there = tmp_path / "node0", tmp_path / "node1"
    shutil.copytree(MODEL, here / "model")
    shutil.copytree(MODEL, there / "model")
    tok = there / "model" / "tokenizer.json"
    spec = json.loads(tok.read_text())
    spec["model"]["merges"] = spec["model"]["merges"][:-1]
    tok.write_text(json.dumps(spec))
    script = tmp_path / "per_rank_cwd.py"
    script.write_text(PER_RANK_CWD)
    args = ["generate", "--model", "model", "--prompt", "hi", "--max-new-tokens", "2"]
    p, dt = run([script, here, there, *args], n=2, module=None)
    line = assert_one_error(p, dt, "the ranks read different tokenizers", "rank 1 has tokenizer")
    assert line.count("tokenizer.json (sha256") == 2


def test_ranks_with_different_models_stop_before_loading(tmp_path):
    """Rank 1's directory of the same name holds another model (another config)."""
    here, there = tmp_path / "node0", tmp_path / "node1"
    shutil.copytree(MODEL, here / "model")
    shutil.copytree(FIXTURES / "tiny-qwen2", there / "model")
    script = tmp_path / "per_rank_cwd.py"
    script.write_text(PER_RANK_CWD)
    args = ["generate", "--model", "model", "--prompt-ids", "1,2", "--max-new-tokens", "2"]
    p, dt = run([script, here, there, *args], n=2, module=None)
    assert_one_error(p, dt, "the ranks read different model configs", "rank 1 has one of")


@pytest.fixture(scope="module")
def r12(tmp_path_factory):
    """tiny-llama-gqa converted for a 1x2 rank grid (decode 2x2, prefill 2x4)."""
    from llm.storage.convert import convert

    out = tmp_path_factory.mktemp("plan") / "r12"
    meshes = {"decode": (2, 2), "prefill": (2, 4)}
    convert(out, str(MODEL), ranks=(1, 2), meshes=meshes, progress=False)
    return out


def test_plan_of_a_shard_set_on_two_ranks_prints_once(r12):
    p, _ = run(["plan", "--model", r12, "--json"], n=2)
    assert p.returncode == 0, p.stderr
    plan = json.loads(p.stdout)  # one JSON document: rank 0 alone prints
    assert plan["phases"]["decode"]["mesh"] == [2, 2]
    assert plan["phases"]["prefill"]["mesh"] == [2, 4]


@pytest.mark.parametrize(
    "damage, phrases",
    [
        ("missing", ["on rank 1: --model model: no such directory"]),
        ("manifest", ["on rank 1:", "manifest.json was modified after conversion"]),
        ("other-model", ["the ranks read different models", "rank 1 has config"]),
    ],
)
def test_plan_stops_every_rank_alike_when_rank_1_reads_another_model(
    damage, phrases, r12, tmp_path
):
    """No shared filesystem: rank 1's copy of ``--model`` is missing, damaged or another model."""
    here, there = tmp_path / "node0", tmp_path / "node1"
    shutil.copytree(r12, here / "model")
    there.mkdir()
    if damage == "manifest":
        shutil.copytree(r12, there / "model")
        manifest = there / "model" / "manifest.json"
        manifest.write_text(manifest.read_text().replace('"float32"', '"float16"', 1))
    if damage == "other-model":
        shutil.copytree(FIXTURES / "tiny-qwen2", there / "model")
    script = tmp_path / "per_rank_cwd.py"
    script.write_text(PER_RANK_CWD)
    p, dt = run([script, here, there, "plan", "--model", "model"], n=2, module=None)
    assert_one_error(p, dt, *phrases)
    assert p.stdout == ""  # rank 0 printed no plan of its own


@pytest.mark.parametrize(
    "extra, phrases",
    [
        (["--prompt-ids", "1,157"], ["token id 157 is outside the vocabulary"]),
        (["--prompt-ids", "1", "--top-p", "0"], ["--top-p", "(0, 1]"]),
        (["--prompt-file", "/nonexistent/prompt.txt"], ["--prompt-file", "No such file"]),
        (["--prompt-ids", "1,2,3,4,5", "--kv-capacity", "1"], ["too small for the prompt"]),
    ],
    ids=["vocab", "top-p", "prompt-file", "kv-prompt"],
)
def test_bad_generate_input_on_two_ranks(extra, phrases, tmp_path):
    before = snapshot(tmp_path, MODEL)
    p, dt = run(["generate", "--model", MODEL, "--max-new-tokens", "4", *extra], n=2)
    assert_one_error(p, dt, *phrases)
    assert changed(before, snapshot(tmp_path, MODEL)) == []


def test_kv_full_on_two_ranks_keeps_the_tokens_of_one_rank():
    args = [
        "generate",
        "--model",
        MODEL,
        "--prompt-ids",
        "1,5,9",
        "--max-new-tokens",
        "8",
        "--ignore-eos",
        "--json",
        "--decode-mesh",
        "2x2",
    ]
    p, _ = run(args)
    assert p.returncode == 0, p.stderr
    full = json.loads(p.stdout)["new_ids"]
    p, dt = run(args + ["--kv-capacity", "2"], n=2)
    assert p.returncode == 0 and dt < 60, p.stderr
    out = json.loads(p.stdout)
    assert out["stopped_by"] == "kv_full" and 0 < len(out["new_ids"]) < 8
    assert out["new_ids"] == full[: len(out["new_ids"])]


def test_prompt_ids_without_a_tokenizer_on_two_ranks():
    p, dt = run(
        [
            "generate",
            "--model",
            FIXTURES / "tiny-qwen2",
            "--prompt-ids",
            "1,5,9",
            "--max-new-tokens",
            "4",
            "--ignore-eos",
            "-q",
        ],
        n=2,
    )
    assert p.returncode == 0 and dt < 60, p.stderr
    assert len(p.stdout.split()) == 4 and all(t.isdigit() for t in p.stdout.split())


def test_nan_weights_on_two_ranks(tmp_path):
    from test_faults import nan_model

    model = nan_model(tmp_path)
    p, dt = run(
        ["generate", "--model", model, "--prompt-ids", "1,5,9", "--max-new-tokens", "3"], n=2
    )
    assert_one_error(p, dt, "non-finite", "layer 1")
