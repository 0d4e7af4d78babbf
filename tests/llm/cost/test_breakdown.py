"""``llm estimate --breakdown``: one layer's modeled cycles, kernel by kernel."""

import json
import os
import subprocess
import sys

import pytest

from llm.cost import estimate
from llm.cost.breakdown import format_breakdown, layer_breakdown
from llm.modeling.config import preset
from meshrt.plmr import WSE2

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))


@pytest.mark.parametrize("name, pmesh, dmesh", [("llama3-8b", 660, 420), ("qwen2-72b", 480, 540)])
def test_layers_and_kernels_add_up_to_the_whole_model(name, pmesh, dmesh):
    config = preset(name)
    b = layer_breakdown(config, (pmesh, pmesh), (dmesh, dmesh), 4096)
    for phase in ("decode", "prefill"):
        s = b[phase]
        for r in s["kernels"] + s["outside_layers"]:
            assert r["compute"] + r["communication"] + r["fixed"] == pytest.approx(r["cycles"])
            assert sum(r["parts"].values()) == pytest.approx(r["cycles"])
        assert sum(r["cycles"] for r in s["kernels"]) == pytest.approx(s["layer_cycles"])
        assert sum(s["layer_split"].values()) == pytest.approx(s["layer_cycles"])
        assert sum(r["share"] for r in s["kernels"]) == pytest.approx(1.0)
        # every kernel of a layer starts with one task switch, and nothing else is fixed
        assert all(r["fixed"] == pytest.approx(WSE2.task_switch) for r in s["kernels"])
    # the whole model = what runs once + every layer (each layer's kernels are new kernels)
    dec = estimate.decode_token(config, (dmesh, dmesh), WSE2, context=4096)
    outside = sum(r["cycles"] for r in b["decode"]["outside_layers"])
    whole = outside + config.num_layers * b["decode"]["layer_cycles"]
    assert dec.cycles == pytest.approx(whole, rel=1e-9)
    pre = estimate.prefill(config, (pmesh, pmesh), 4096, WSE2, (dmesh, dmesh))
    outside = sum(r["cycles"] for r in b["prefill"]["outside_layers"])
    whole = outside + config.num_layers * b["prefill"]["layer_cycles"]
    assert pre.totals().cycles == pytest.approx(whole, rel=1e-9)


def test_a_decode_layer_is_mostly_communication_and_fixed_costs():
    # the paper: communication is up to 90% of a distributed GEMV on WSE-2 at high
    # parallelism; a decode layer of LLaMA3-8B on 420x420 is far from compute-bound
    b = layer_breakdown(preset("llama3-8b"), (660, 660), (420, 420), 4096)["decode"]
    split = b["layer_split"]
    assert split["communication"] > 2 * split["compute"]
    gemvs = {r["kernel"]: r for r in b["kernels"]}
    assert {"qkv", "o", "gate_up", "down", "scores", "softmax", "pv"} <= gemvs.keys()
    # closed form of the local gate/up GEMV: a core's [4200/420, 2*14700/420] tile (dimensions
    # padded to multiples of 420), 2 MACs per cycle, one vector instruction per input row
    rows, cols = 4200 // 420, 2 * 14700 // 420
    local = rows * cols / WSE2.macs_per_cycle + rows * WSE2.vector_setup
    assert gemvs["gate_up"]["parts"]["local"] == pytest.approx(local)
    text = format_breakdown(layer_breakdown(preset("llama3-8b"), (660, 660), (420, 420), 4096))
    assert "decode 420x420" in text and "prefill 660x660" in text and "gate_up" in text


def test_estimate_breakdown_cli():
    cmd = [sys.executable, "-m", "llm", "estimate", "--preset", "llama3-8b"]
    cmd += ["--decode-mesh", "420x420", "--prefill-mesh", "660x660", "--breakdown"]
    p = subprocess.run(cmd + ["--json"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    b = json.loads(p.stdout)
    assert b["decode"]["mesh"] == [420, 420] and b["prefill"]["tokens"] == 4096
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "kernel" in p.stdout and "outside the layers" in p.stdout
    p = subprocess.run(
        [sys.executable, "-m", "llm", "estimate", "--calibration", "--breakdown"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2 and "--breakdown needs --preset" in p.stderr


@pytest.mark.parametrize(
    "model,side", [("llama3-8b", 420), ("llama2-13b", 420), ("llama2-13b", 540)]
)
def test_breakdown_stages_add_up_to_the_decode_tables_time_per_token(model, side):
    from llm.cost.predict import decode_tpr
    from meshrt.plmr import WSE2

    d = layer_breakdown(preset(model), (side, side), (side, side), 4096)["decode"]
    assert sum(r["layers"] for r in d["stages"]) == preset(model).num_layers
    assert d["step_seconds"] == pytest.approx(1 / decode_tpr(preset(model), (side, side), WSE2))
    text = format_breakdown(layer_breakdown(preset(model), (side, side), (side, side), 4096))
    assert f"{len(d['stages'])} stage(s)" in text
