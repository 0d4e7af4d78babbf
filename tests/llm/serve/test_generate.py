"""``llm generate``'s text summary: this run's ledger and the whole model on the wafer, named
apart and equal to the numbers of the ``--json`` record (whole processes, one rank)."""

import json

from faultcase import run
from goldens import FIXTURES

from llm.cost.predict import modeled_wafer
from llm.modeling.config import preset
from llm.serve.generate import format_whole_model

MODEL = FIXTURES / "tiny-llama-gqa"
ARGS = ["generate", "--model", MODEL, "--prompt-ids", "1,5,9", "--max-new-tokens", "6"]


def test_summary_names_the_run_ledger_and_the_whole_model():
    p, _ = run([*ARGS, "--ignore-eos", "--json"])
    assert p.returncode == 0, p.stderr
    rec = json.loads(p.stdout)
    assert rec["layers_run"] == 3 and rec["decode_mesh"] == [2, 2]
    p, _ = run([*ARGS, "--ignore-eos"])
    assert p.returncode == 0, p.stderr
    lines = p.stderr.splitlines()
    (ledger,) = [s for s in lines if "this run's ledger" in s]
    (whole,) = [s for s in lines if "whole model on the wafer" in s]
    assert "6 tokens (max_new_tokens)" in ledger and "on this machine |" in ledger
    assert "modeled wse2, this run's ledger (3 layers, decode 2x2, prefill 2x2 cores):" in ledger
    assert f"TTFT {rec['modeled_ttft_s'] * 1e3:.4f} ms" in ledger
    assert f"TPOT {rec['modeled_tpot_s'] * 1e3:.4f} ms" in ledger
    w = rec["wafer"]
    assert whole.startswith("modeled wse2, whole model on the wafer (closed form, as llm estimate;")
    assert "1+1 stages on 1 wafer)" in whole
    assert f"TTFT {w['ttft_s'] * 1e3:.4f} ms" in whole
    assert f"end-to-end TPR {w['e2e_tpr']:.1f} tok/s" in whole
    assert "whole model" not in ledger and "ledger" not in whole


def test_whole_model_line_says_why_it_cannot_be_placed():
    bad = modeled_wafer(preset("llama-100m"), (8, 8), (8, 8), 16, 4)
    line = format_whole_model(bad, "wse2")
    assert line.startswith("modeled wse2, whole model on the wafer (closed form, as llm estimate)")
    assert line.endswith("not placeable: " + bad["error"])


def test_no_stream_prints_the_text_once_at_the_end():
    rec = json.loads(run([*ARGS, "--ignore-eos", "--json"])[0].stdout)
    p, _ = run([*ARGS, "--ignore-eos", "--no-stream"])
    assert p.returncode == 0, p.stderr
    assert p.stdout == rec["text"] + "\n"
    assert "this run's ledger" in p.stderr  # the summary is still printed
