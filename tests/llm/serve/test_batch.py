"""``llm generate --batch``: results per request, resuming, bad lines, --strict, under mpiexec."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from cliproc import ENV, MPIEXEC, ROOT, needs_mpiexec

FIXTURE = os.path.join(ROOT, "tests", "fixtures", "tiny-llama-gqa")
TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
REQUESTS = [
    {"id": "a", "prompt": "the mesh passes", "max_new_tokens": 5},
    {"id": 2, "prompt_ids": [1, 5, 9], "max_new_tokens": 4},
    {"id": "chat", "messages": [{"role": "user", "content": "the cache"}], "max_new_tokens": 3},
    {"id": "hot", "prompt_ids": [1, 7], "max_new_tokens": 6, "temperature": 0.8, "seed": 3},
]
BAD = [
    "not json",
    json.dumps({"id": "a", "prompt": "again"}),
    json.dumps({"id": "x", "prompt": "p", "bogus": 1}),
    json.dumps({"id": "y"}),
    json.dumps({"id": "z", "prompt_ids": [1, 999]}),
    json.dumps({"id": "w", "prompt": "p", "max_new_tokens": 100000}),
    json.dumps({"id": "v", "prompt": "p", "top_p": 0}),
]


@pytest.fixture()
def model_dir(tmp_path):
    """The tiny fixture plus a chat template."""
    d = tmp_path / "model"
    shutil.copytree(FIXTURE, d)
    (d / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": TEMPLATE, "bos_token": "<s>"})
    )
    return d


def llm(args, n=None, timeout=120):
    cmd = ([MPIEXEC, "-n", str(n)] if n else []) + [sys.executable, "-m", "llm"] + args
    return subprocess.run(
        cmd,
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def write_lines(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))


def results(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def batch(model_dir, req, out, *extra, n=None):
    return llm(
        [
            "generate",
            "--model",
            str(model_dir),
            "--decode-mesh",
            "2x2",
            "--batch",
            str(req),
            "--out",
            str(out),
            *extra,
        ],
        n=n,
    )


def test_batch_results_equal_single_runs_and_bad_lines_are_skipped(model_dir, tmp_path):
    req, out = tmp_path / "req.jsonl", tmp_path / "out.jsonl"
    write_lines(req, REQUESTS[:2] + BAD[:3] + ["", "   "] + REQUESTS[2:] + BAD[3:])
    p = batch(model_dir, req, out)
    assert p.returncode == 0, p.stderr
    got = {r["id"]: r for r in results(out)}
    assert list(got) == ["a", 2, "chat", "hot"]
    assert got["a"]["line"] == 1 and got["chat"]["line"] == 8
    # each line the record of `generate --json` for the same request
    single = llm(
        [
            "generate",
            "--model",
            str(model_dir),
            "--decode-mesh",
            "2x2",
            "--prompt",
            "the mesh passes",
            "--max-new-tokens",
            "5",
            "--json",
        ]
    )
    assert single.returncode == 0, single.stderr
    ref = json.loads(single.stdout)
    assert set(ref) <= set(got["a"])
    for key in ("prompt_ids", "new_ids", "text", "stopped_by", "new_tokens", "decode_mesh"):
        assert got["a"][key] == ref[key]
    assert len(got[2]["new_ids"]) == 4 and got[2]["prompt_ids"] == [1, 5, 9]
    # messages go through the model's chat template (BOS text of the template is one token)
    from llm.text.tokenizer import load_tokenizer

    tok = load_tokenizer(model_dir)
    text = "<s>user: the cache\nassistant:"
    assert got["chat"]["prompt_ids"] == tok.encode(text, add_special_tokens=False)
    # every bad line is named by its number
    for number, what in (
        (3, "not JSON"),
        (4, "duplicate id 'a'"),
        (5, "unknown keys bogus"),
        (10, "give exactly one of"),
        (11, "outside the vocabulary"),
        (12, "exceeds the model context"),
        (13, "top_p"),
    ):
        assert any(
            line.startswith(f"{req}:{number}: ") and what in line for line in p.stderr.splitlines()
        ), (number, p.stderr)


def test_rerun_skips_done_ids_and_cuts_a_half_written_line(model_dir, tmp_path):
    req, out = tmp_path / "req.jsonl", tmp_path / "out.jsonl"
    write_lines(req, REQUESTS)
    assert batch(model_dir, req, out).returncode == 0
    full = out.read_text()
    p = batch(model_dir, req, out)  # nothing left to do
    assert p.returncode == 0 and out.read_text() == full
    assert "4 already in" in p.stderr
    # a job killed while writing its last result: the line has no newline
    lines = full.splitlines(keepends=True)
    out.write_text("".join(lines[:2]) + lines[2][:40])
    p = batch(model_dir, req, out)
    assert p.returncode == 0, p.stderr
    assert "half-written" in p.stderr and "2 already in" in p.stderr
    again = results(out)
    assert [r["id"] for r in again] == ["a", 2, "chat", "hot"]
    # greedy and seeded sampling give the same tokens on the rerun
    assert [r["new_ids"] for r in again] == [json.loads(x)["new_ids"] for x in lines]


def test_strict_stops_before_running_and_foreign_out_is_refused(model_dir, tmp_path):
    req, out = tmp_path / "req.jsonl", tmp_path / "out.jsonl"
    write_lines(req, REQUESTS[:1] + ["{broken"])
    p = batch(model_dir, req, out, "--strict")
    assert p.returncode == 2
    assert f"error: {req}:2: not JSON" in p.stderr and "nothing was run" in p.stderr
    assert not out.exists() or out.read_text() == ""
    out.write_text("some log text\n")
    p = batch(model_dir, req, out)
    assert p.returncode == 2 and "is not a result line" in p.stderr
    assert out.read_text() == "some log text\n"
    p = llm(["generate", "--model", str(model_dir), "--batch", str(req)])
    assert p.returncode == 2 and "--batch needs --out" in p.stderr


@needs_mpiexec
def test_batch_under_mpiexec_matches_one_process(model_dir, tmp_path):
    req = tmp_path / "req.jsonl"
    write_lines(req, REQUESTS)
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    assert batch(model_dir, req, one).returncode == 0
    p = batch(model_dir, req, two, n=2)
    assert p.returncode == 0, p.stderr
    a, b = results(one), results(two)
    assert [r["new_ids"] for r in a] == [r["new_ids"] for r in b]
    assert b[0]["ranks"] in ([1, 2], [2, 1])
