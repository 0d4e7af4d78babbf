"""Command line and failure behaviour, driven as a user would: whole processes under mpiexec."""

import os
import subprocess
import sys
import time

import pytest
from cliproc import ENV, MPIEXEC, ROOT, needs_mpiexec


def run(args, n=None, timeout=120):
    cmd = ([MPIEXEC, "-n", str(n)] if n else []) + [sys.executable] + args
    t0 = time.monotonic()
    p = subprocess.run(
        cmd,
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    return p, time.monotonic() - t0


FAILING_RANK = """
import sys
from meshrt import runtime
def main(argv):
    comm = runtime.world()
    if comm.Get_rank() == 1:
        raise RuntimeError("boom on purpose")
    comm.Barrier()   # the other ranks wait for rank 1 forever unless the job is aborted
runtime.run_main(main)
"""


@needs_mpiexec
def test_one_failing_rank_ends_the_job_promptly():
    p, dt = run(["-c", FAILING_RANK], n=3, timeout=60)
    assert p.returncode != 0
    assert "rank 1/3" in p.stderr and "RuntimeError: boom on purpose" in p.stderr
    assert "Traceback" in p.stderr
    assert dt < 30, f"took {dt:.1f}s to end"


def test_info_one_process():
    p, _ = run(["-m", "meshrt", "info", "--mesh", "8x6", "--json"])
    assert p.returncode == 0, p.stderr
    import json

    info = json.loads(p.stdout)
    assert info["virtual_mesh"] == "8x6" and info["rank_grid"] == "1x1"
    assert "wse2" in info["devices"] and info["mpi4py"]
    assert info["blas"] and info["blas"] != "?"  # threadpoolctl's list, or numpy's own config


@needs_mpiexec
def test_info_under_mpiexec_validates_mesh_on_every_rank():
    p, _ = run(["-m", "meshrt", "info", "--mesh", "6x4"], n=4)
    assert p.returncode == 0, p.stderr
    assert "rank_grid: 2x2" in p.stdout and p.stdout.count("rank_grid") == 1  # rank 0 prints
    p, dt = run(["-m", "meshrt", "info", "--mesh", "6x5"], n=4)
    assert p.returncode == 2
    assert p.stderr.count("4 ranks cannot tile a 6x5 virtual mesh") == 1
    assert "rank counts that fit" in p.stderr
    p, _ = run(["-m", "meshrt", "info", "--mesh", "8x8", "--ranks", "3x1"], n=2)
    assert p.returncode == 2 and "needs 3 ranks but 2 are running" in p.stderr


@pytest.mark.parametrize("bad", ["0x4", "4x-2", "axb"])
def test_invalid_mesh_one_clear_message(bad):
    p, _ = run(["-m", "meshrt", "info", "--mesh", bad])
    assert p.returncode == 2
    assert p.stderr.startswith("error:") and "mesh" in p.stderr
    assert "Traceback" not in p.stderr


def test_help_teaches():
    p, _ = run(["-m", "meshrt", "--help"])
    assert p.returncode == 0 and "Examples" in p.stdout and "mpiexec" in p.stdout
    p, _ = run(["-m", "meshrt", "bench", "--help"])
    assert p.returncode == 0 and "--repeat" in p.stdout


def test_bench_model_and_calibrate(tmp_path):
    out = tmp_path / "m.json"
    p, _ = run(
        [
            "-m",
            "meshrt",
            "bench",
            "model",
            "--kernel",
            "gemv",
            "--sides",
            "60,720",
            "--sizes",
            "2048",
            "--json",
            str(out),
        ]
    )
    assert p.returncode == 0, p.stderr
    import json

    rows = json.loads(out.read_text())
    k = {(r["algo"], r["side"]): r["ms"] for r in rows}
    assert k[("ktree", 720)] < k[("pipeline", 720)]
    p, _ = run(["-m", "meshrt", "bench", "calibrate"])
    assert p.returncode == 0 and "beta=" in p.stdout


@pytest.mark.parametrize("n", [None, 2], ids=["one-process", "2-ranks"])
@pytest.mark.parametrize(
    "what, algos", [("gemv", "ktree,pipeline,ring"), ("gemm", "meshgemm,cannon,summa")]
)
def test_bench_check_compares_every_algorithm_with_numpy(what, algos, n, tmp_path):
    if n and not os.path.exists(MPIEXEC):
        pytest.skip("no mpiexec in the venv")
    import json

    out = tmp_path / "rows.json"
    args = ["--mesh", "4x4", "--size", "32", "--repeat", "1", "--warmup", "0", "--check"]
    p, _ = run(["-m", "meshrt", "bench", what, *args, "--algo", algos, "--json", str(out)], n=n)
    assert p.returncode == 0, p.stderr
    rows = json.loads(out.read_text())
    assert [r["algo"] for r in rows] == algos.split(",")
    for r in rows:  # float32 sums of 32 products in another order
        assert 0 <= r["max_abs_err"] < 1e-4, r


@needs_mpiexec
def test_convert_then_generate_with_prefill_matches_transformers(tmp_path):
    """The user's path end to end: HF checkpoint -> shards (prefill 2x6, decode 4x4, 2x2 ranks)
    -> generate under mpiexec: the greedy tokens of transformers, on 4 ranks."""
    import json

    import numpy as np

    fixture = os.path.join(ROOT, "tests", "fixtures", "tiny-llama-gqa")
    exp = np.load(os.path.join(fixture, "expected.npz"))
    out = tmp_path / "shards"
    p, _ = run(
        [
            "-m",
            "llm",
            "convert",
            fixture,
            "--out",
            str(out),
            "--ranks",
            "2x2",
            "--decode-mesh",
            "4x4",
            "--prefill-mesh",
            "2x6",
        ],
        n=4,
    )
    assert p.returncode == 0, p.stderr
    ids = ",".join(str(int(t)) for t in exp["prompt_ids"])
    p, _ = run(
        [
            "-m",
            "llm",
            "generate",
            "--model",
            str(out),
            "--prompt-ids",
            ids,
            "--max-new-tokens",
            "16",
            "--ignore-eos",
            "--json",
        ],
        n=4,
    )
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert res["new_ids"] == [int(t) for t in exp["greedy_ids"]]
    assert res["prefill_mesh"] == [2, 6] and res["decode_mesh"] == [4, 4]
    assert res["modeled_ttft_s"] > 0 and res["modeled_tpr"] > 0


def test_one_new_token_reports_no_time_per_token(tmp_path):
    # a time per token needs two new tokens: with one, JSON says null (strict JSON, no NaN)
    # and the text says n/a, in generate and in bench
    import json

    fixture = os.path.join(ROOT, "tests", "fixtures", "tiny-llama-gqa")
    out = tmp_path / "shards"
    p, _ = run(["-m", "llm", "convert", fixture, "--out", str(out), "--decode-mesh", "2x2", "-q"])
    assert p.returncode == 0, p.stderr
    gen = ["-m", "llm", "generate", "--model", str(out), "--prompt-ids", "5,6,7"]
    p, _ = run(gen + ["--max-new-tokens", "1", "--json"])
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout, parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert len(res["new_ids"]) == 1 and res["ttft_s"] > 0
    assert res["tpot_s"] is None and res["modeled_tpot_s"] is None and res["modeled_tpr"] is None
    p, _ = run(gen + ["--max-new-tokens", "1"])
    assert p.returncode == 0, p.stderr
    text = p.stdout + p.stderr  # the text, then the summary lines on the log
    assert "TPOT n/a (one new token)" in text and "nan" not in text.lower()
    p, _ = run(gen + ["--max-new-tokens", "3", "--ignore-eos", "--json"])
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert res["tpot_s"] > 0 and res["modeled_tpr"] == pytest.approx(1 / res["modeled_tpot_s"])
    bench = ["-m", "llm", "bench", "--preset", "tiny-llama", "--decode-mesh", "2x2"]
    bench += ["--prompt-len", "5", "--new-tokens", "1", "--repeat", "1", "--warmup", "0"]
    p, _ = run(bench + ["--json"])
    assert p.returncode == 0, p.stderr
    em = json.loads(p.stdout, parse_constant=lambda c: pytest.fail(f"{c} in JSON"))["emulator"]
    assert em["ttft_s"] > 0 and em["tpot_s"] is None and em["median_tpot_s"] is None
    p, _ = run(bench)
    assert p.returncode == 0, p.stderr
    assert (p.stdout + p.stderr).count("n/a (one new token)") == 2, p.stdout + p.stderr


def test_bench_of_a_shard_set_runs_and_reports_its_meshes(tmp_path):
    # the shard set's meshes, not bench's random-weight default (8x8); another mesh is an error
    import json

    fixture = os.path.join(ROOT, "tests", "fixtures", "tiny-llama-gqa")
    out = tmp_path / "shards"
    convert = ["-m", "llm", "convert", fixture, "--out", str(out), "-q"]
    p, _ = run(convert + ["--decode-mesh", "2x2", "--prefill-mesh", "2x4"])
    assert p.returncode == 0, p.stderr
    bench = ["-m", "llm", "bench", "--model", str(out), "--prompt-len", "4", "--new-tokens", "2"]
    bench += ["--repeat", "1", "--warmup", "0"]
    p, _ = run(bench + ["--json"])
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert res["decode_mesh"] == [2, 2] and res["prefill_mesh"] == [2, 4]
    assert res["full_model_estimate"]["decode_tpr"] > 0
    p, _ = run(bench + ["--decode-mesh", "4x4"])
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "converted for" in p.stderr or "4x4 was requested" in p.stderr, p.stderr
    # an HF directory is placed as generate places it: 2x2 cores per rank by default
    bench[bench.index(str(out))] = fixture
    p, _ = run(bench + ["--json"])
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert res["decode_mesh"] == [2, 2] and res["placing_s"] >= 0
