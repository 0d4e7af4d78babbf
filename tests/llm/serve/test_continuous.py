"""Continuous batching: ``generate --batch --max-batch B`` and its scheduler."""

import json

import pytest
import test_batch
from goldens import FIXTURES
from test_batch import batch, results, write_lines

from llm.engine.model import MeshModel
from llm.serve.generate import generate
from llm.serve.scheduler import Job, run_continuous, slots_needed
from llm.storage.checkpoint import load_checkpoint
from llm.text.sampling import Sampler

REQUESTS = [
    {"id": "a", "prompt": "the mesh passes", "max_new_tokens": 5},
    {"id": 2, "prompt_ids": [1, 5, 9], "max_new_tokens": 9},
    {"id": "short", "prompt_ids": [4], "max_new_tokens": 1},
    {"id": "hot", "prompt_ids": [1, 7], "max_new_tokens": 6, "temperature": 0.8, "seed": 3},
    {"id": "long", "prompt_ids": list(range(3, 40)), "max_new_tokens": 7},
    {"id": "stop", "prompt_ids": [2, 8, 6], "max_new_tokens": 8, "stop": [123]},
    {"id": "k", "prompt_ids": [9, 9], "max_new_tokens": 4, "temperature": 1.1, "top_k": 5},
]
model_dir = test_batch.model_dir  # the tiny fixture model with a chat template

SAME = ("id", "line", "prompt_ids", "new_ids", "text", "stopped_by", "new_tokens")


def _records(path):
    return [{k: r[k] for k in SAME} for r in results(path)]


def test_batched_job_writes_what_the_sequential_job_writes(model_dir, tmp_path):
    req = tmp_path / "req.jsonl"
    write_lines(req, REQUESTS)
    outs = {}
    for flags in (["--max-batch", "1"], ["--max-batch", "3"], ["--kv-pool", "30"]):
        out = tmp_path / f"out{len(outs)}.jsonl"
        p = batch(model_dir, req, out, *flags)
        assert p.returncode == 0, p.stderr
        outs[tuple(flags)] = _records(out)
    one = outs[("--max-batch", "1")]
    assert [r["id"] for r in one] == [r["id"] for r in REQUESTS]  # the requests' order
    assert {r["stopped_by"] for r in one} >= {"max_new_tokens"}
    for got in outs.values():
        assert got == one


def test_batched_job_resumes_and_stops_a_full_cache_visibly(model_dir, tmp_path):
    req, out = tmp_path / "req.jsonl", tmp_path / "out.jsonl"
    fits = [r for r in REQUESTS if r["id"] != "long"]  # every prompt fits 4 slots on 2 rows
    write_lines(req, fits[:1])
    assert batch(model_dir, req, out, "--kv-capacity", "4").returncode == 0
    with open(out, "a") as f:
        f.write('{"id": 2, "li')  # a job killed while writing
    write_lines(req, fits)
    p = batch(model_dir, req, out, "--max-batch", "4", "--kv-capacity", "4")
    assert p.returncode == 0, p.stderr
    got = results(out)
    assert [r["id"] for r in got] == [r["id"] for r in fits]
    # 4 slots per core on 2 rows hold 8 tokens: longer requests end with kv_full, kept tokens
    by_id = {r["id"]: r for r in got[1:]}
    assert by_id[2]["stopped_by"] == "kv_full" and len(by_id[2]["new_ids"]) == 8 - 3 + 1


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--max-batch", "0"], "--max-batch: 0 must be positive"),
        (["--max-batch", "-2"], "--max-batch: -2 must be positive"),
        (["--kv-pool", "3"], "--kv-pool 3 is too small: each request's KV cache needs"),
        # the 37-token prompt of "long" needs 19 slots per core on 2 rows: refused before
        # anything runs, batched or not (it was a ContextFullError traceback)
        (["--kv-capacity", "4"], "id 'long': --kv-capacity 4 is too small for its prompt"),
        (["--kv-capacity", "4", "--max-batch", "1"], "id 'long': --kv-capacity 4 is too small"),
    ],
)
def test_bad_batch_settings_are_one_error_line(model_dir, tmp_path, flags, message):
    req, out = tmp_path / "req.jsonl", tmp_path / "out.jsonl"
    write_lines(req, REQUESTS)
    p = batch(model_dir, req, out, *flags)
    assert p.returncode == 2
    errors = [line for line in p.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("error:") and message in errors[0], p.stderr
    assert "Traceback" not in p.stderr
    assert not out.exists() or out.read_text() == ""


def test_requests_that_do_not_fit_the_pool_wait():
    config, weights = load_checkpoint(FIXTURES / "tiny-llama-gqa")
    model = MeshModel.from_weights(config, weights, None, decode_mesh=(2, 2), progress=False)
    jobs = [
        Job(i, list(range(3, 3 + n)), new, Sampler(0.9, seed=i) if i % 2 else None)
        for i, (n, new) in enumerate([(2, 6), (9, 3), (1, 8), (5, 5), (3, 2), (7, 6)])
    ]
    alone = []
    for j in jobs:
        sampler = Sampler(0.9, seed=j.key) if j.key % 2 else None
        alone.append(generate(model, j.prompt_ids, j.max_new_tokens, sampler).new_ids)
    widths = []
    step = model.decode_sequences

    def counting(seqs, tokens):
        widths.append(len(seqs))
        return step(seqs, tokens)

    model.decode_sequences = counting
    cap = slots_needed(model, jobs, None)
    finished = []
    gens = run_continuous(
        model, jobs, 4, cap, pool=2 * cap + 1, on_done=lambda j, g: finished.append(j.key)
    )
    assert [g.new_ids for g in gens] == alone  # none dropped, none cut short
    assert max(widths) == 2 and sorted(finished) == list(range(len(jobs)))
    assert finished != sorted(finished)  # short requests finish first
    with pytest.raises(ValueError, match="holds no cache"):
        run_continuous(model, jobs, 4, cap, pool=cap - 1)


def test_bench_batch_reports_per_request_and_total_rates():
    from test_batch import llm

    bench = ["bench", "--preset", "tiny-llama", "--decode-mesh", "2x2", "--prompt-len", "5"]
    bench += ["--new-tokens", "4", "--repeat", "1", "--warmup", "0", "--batch", "3"]
    p = llm(bench + ["--json"])
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    em = out["emulator"]
    assert out["batch"] == 3 and em["tpot_s"] > 0 and em["total_tokens_per_s"] > 0
    assert em["modeled_total_tokens_per_s"] == pytest.approx(3 * em["modeled_tpr"])
    p = llm(bench)
    assert p.returncode == 0 and "batch 3: per request TPOT" in p.stdout, p.stderr
    p = llm(bench[:-1] + ["0"])
    assert p.returncode == 2 and p.stderr.startswith("error:") and "--batch" in p.stderr


def test_prompts_admitted_together_are_prefilled_together():
    config, weights = load_checkpoint(FIXTURES / "tiny-llama-gqa")
    model = MeshModel.from_weights(config, weights, None, decode_mesh=(2, 2), progress=False)
    lengths = [(2, 6), (9, 3), (1, 8), (5, 5), (3, 2), (7, 6)]
    jobs = [Job(i, list(range(3, 3 + n)), new) for i, (n, new) in enumerate(lengths)]
    alone = [generate(model, j.prompt_ids, j.max_new_tokens, None).new_ids for j in jobs]
    prefills = []
    run = model.prefiller.run

    def counting(ids, all_logits=False, lengths=None):
        prefills.append(len(ids) if lengths is None else list(lengths))
        return run(ids, all_logits, lengths)

    model.prefiller.run = counting
    cap = slots_needed(model, jobs, None)
    gens = run_continuous(model, jobs, 4, cap)
    assert [g.new_ids for g in gens] == alone
    # the first four together; then each freed slot's prompt (alone, or two at once)
    assert prefills[0] == [2, 9, 1, 5] and len(prefills) < len(jobs)
    assert gens[0].ttft_s == gens[3].ttft_s  # one prefill, one first pick for all four
    prefills.clear()
    gens = run_continuous(model, jobs, 4, cap, prefill_tokens=11)  # at most 11 tokens at once
    assert [g.new_ids for g in gens] == alone
    assert prefills[:2] == [[2, 9], [1, 5]]
