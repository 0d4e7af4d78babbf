"""Closed-form predictions: the trends the paper states, placement, the estimate command."""

import json
import os
import subprocess
import sys

import pytest

from llm.cost.predict import decode_tpr, predict
from llm.cost.wafer import PlacementError, kv_capacity, place, place_decode
from llm.modeling.config import preset
from meshrt.collectives import AllreduceSpec
from meshrt.ops.estimate import estimate_cannon, estimate_meshgemm, estimate_summa
from meshrt.ops.gemv import estimate_meshgemv
from meshrt.plmr import WSE2

PAPER_MODELS = ("llama3-8b", "llama2-13b", "codellama-34b", "qwen2-72b")
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))


# ----------------------------------------------------------------------------------------------
# Trends the paper states (§5.2 of the notes); none of these is a fit target
# ----------------------------------------------------------------------------------------------

FLAT_72B = (
    "modeled per-layer decode time of the 64-head models is flat between 420 and 540 "
    "(GEMV compute shrinking as 1/N^2 balances the K-tree's N-hop latency growth, and "
    "the all-heads scores allreduce carries fill x 64 words, shrinking with the mesh); "
    "no physically justified missing cost was found, see the docstring"
)


FOLDED_13B = (
    "one wafer holds LLaMA2-13B decoding on 420x420 only with three 420x420 stages (one folded "
    "2x, its column links 2 hops) and two remainder stages (331x331 folded 3x, 308x308 folded "
    "2x): their layers cost 23-41% more than an unfolded 420x420 layer, so 420 (1778 tok/s) "
    "falls below 540 (1885) and 660 (1829); 540 > 660 still holds"
)
FOLDED_34B = (
    "CodeLLaMA-34B on 420x420: every wafer of its layer subset holds two 420x420 stages and one "
    "folded 2x (its layers 19% slower), which 660x660 stages never need: 660 (1364 tok/s) is "
    "faster than 420 (1319)"
)


@pytest.mark.parametrize(
    "name",
    [
        "llama3-8b",
        pytest.param("llama2-13b", marks=pytest.mark.xfail(strict=True, reason=FOLDED_13B)),
        pytest.param("codellama-34b", marks=pytest.mark.xfail(strict=True, reason=FLAT_72B)),
        pytest.param("qwen2-72b", marks=pytest.mark.xfail(strict=True, reason=FLAT_72B)),
    ],
)
def test_decode_tpr_falls_from_420_through_540_to_660(name):
    """The paper: decode TPR falls from 420x420 to 660x660 for every model (420 > 540 > 660).

    Known gap for CodeLLaMA-34B and QWen2-72B (expected failures). What was checked:

    * Stage hand-overs and the layer-subset method: the hand-overs per layer fall as the mesh
      grows (fewer, larger stages), so they favour the larger mesh; inter-wafer links are not
      in the paper's one-wafer measurement.
    * Per-hop latency: the two Table-6 GEMV points (720x720) bound ``alpha`` to at most about
      1.3 cycles per hop even with ``beta`` = 0, so the K-tree's N-hop growth cannot be much
      steeper than modeled; the fitted ``task_switch`` is a per-kernel constant (the GEMV
      points, one kernel repeated, contain none of it).
    * Grouping attention by head (paper §4.4: "running ... locally after grouping by head";
      each head's scores reduced over the columns holding it, softmax over a core's own
      heads) removes the shrinking all-heads scores term. Priced that way (one-layer cycles
      at 420/540/660), per query head: 34B 13041/13143/14090 (monotone), 72B
      13764/13622/14416; per K/V head (this project's feature layout): 34B
      13892/13892/14758, 72B 14616/14371/15085. QWen2-72B stays 1-2% faster per layer at
      540 than at 420 either way, and the emulator would have to run that schedule too; it
      is not in the model.

    The two tests stay expected failures until a cost with a source explains the fall.
    """
    c = preset(name)
    tpr = [decode_tpr(c, (s, s), WSE2, 4096) for s in (420, 540, 660)]
    assert tpr[0] > tpr[1] > tpr[2]


@pytest.mark.parametrize(
    "name",
    [
        "llama3-8b",
        pytest.param("llama2-13b", marks=pytest.mark.xfail(strict=True, reason=FOLDED_13B)),
        pytest.param("codellama-34b", marks=pytest.mark.xfail(strict=True, reason=FOLDED_34B)),
        pytest.param("qwen2-72b", marks=pytest.mark.xfail(strict=True, reason=FLAT_72B)),
    ],
)
def test_decode_tpr_at_660_is_below_420(name):
    """The endpoints of the stated trend hold for all but the 72B model (same gap as above)."""
    c = preset(name)
    assert decode_tpr(c, (660, 660), WSE2, 4096) < decode_tpr(c, (420, 420), WSE2, 4096)


@pytest.mark.parametrize(
    "name",
    [
        "llama3-8b",
        "llama2-13b",
        "codellama-34b",
        "qwen2-72b",
    ],
)
def test_prefill_tpr_rises_from_480_to_720(name):
    c = preset(name)
    tpr = [predict(c, (s, s), (s, s), 4096, 1)["prefill_tpr"] for s in (480, 600, 720)]
    assert tpr[0] < tpr[1] < tpr[2]


@pytest.mark.parametrize("name,paper_growth", [("llama3-8b", 1.4), ("qwen2-72b", 1.6)])
def test_prefill_grows_far_less_than_the_core_count(name, paper_growth):
    # the paper's prose: prefill TPR grows 1.4x (8B) and 1.6x (72B) from 480x480 to 720x720,
    # while the core count grows 2.25x; within 25% of the stated growth
    c = preset(name)
    lo, hi = (predict(c, (s, s), (s, s), 4096, 1)["prefill_tpr"] for s in (480, 720))
    assert paper_growth / 1.25 < hi / lo < paper_growth * 1.25


@pytest.mark.parametrize("n", [4096, 16384])
def test_meshgemm_beats_cannon_and_summa_at_720(n):
    mesh = (720, 720)
    mg, cn, su = (
        f(n, n, n, mesh, WSE2).cycles for f in (estimate_meshgemm, estimate_cannon, estimate_summa)
    )
    assert mg < cn and mg < su


def test_meshgemm_efficiency_near_the_hardware_limit():
    # the paper: MeshGEMM keeps over 70% compute efficiency near the hardware limit
    n = 16384
    led = estimate_meshgemm(n, n, n, (720, 720), WSE2)
    ideal = n**3 / 720**2 / WSE2.macs_per_cycle
    assert ideal / led.cycles > 0.7


@pytest.mark.parametrize("side", [300, 360, 480, 600, 720])
def test_ktree_beats_pipeline_and_ring_beyond_300(side):
    cyc = {
        a: estimate_meshgemv(16384, 16384, (side, side), WSE2, spec=AllreduceSpec(a)).cycles
        for a in ("ktree", "pipeline", "ring")
    }
    assert cyc["ktree"] < cyc["pipeline"] and cyc["ktree"] < cyc["ring"]


def test_meshgemv_against_the_pipeline_baseline_at_720():
    # the paper: MeshGEMV ~4.6x faster than Cerebras' pipeline-allreduce GEMV
    kt, pl = (
        estimate_meshgemv(16384, 16384, (720, 720), WSE2, spec=AllreduceSpec(a)).cycles
        for a in ("ktree", "pipeline")
    )
    assert 3.0 < pl / kt < 8.0


# ----------------------------------------------------------------------------------------------
# Placement
# ----------------------------------------------------------------------------------------------


def test_mesh_larger_than_the_fabric_is_an_error():
    with pytest.raises(PlacementError, match="larger than the wse2 fabric"):
        place(preset("llama3-8b"), WSE2, (800, 800), (360, 360), 128, 8)


def test_layer_that_does_not_fit_a_core_is_an_error():
    with pytest.raises(PlacementError, match="one layer alone"):
        place_decode(preset("qwen2-72b"), WSE2, (32, 32), 16)


def test_stages_hold_every_layer_and_fit_the_core():
    c = preset("llama3-8b")
    stages = place_decode(c, WSE2, (360, 360), 4096).stages
    assert len(stages) > 1
    assert sum(s.layers for s in stages) == c.num_layers
    for s in stages:
        used = s.weight_bytes + s.kv_bytes + s.buffer_bytes + WSE2.reserved_bytes
        assert used + s.free_bytes == pytest.approx(WSE2.mem_per_core, abs=1)
        assert s.free_bytes >= 0
    fewer = place_decode(c, WSE2.with_(mem_per_core=480 * 1024), (360, 360), 4096).stages
    assert len(fewer) == 1


def test_models_larger_than_a_wafer_are_priced_as_a_layer_subset():
    r = predict(preset("qwen2-72b"), (720, 720), (720, 720), 4096, 4)
    assert r["wafers"] > 1 and r["method"].startswith("layer-subset")
    assert r["violations"] and r["decode_tpr"] > 0 and r["ttft_s"] > 0


def test_small_model_phases_coexist_without_weight_replacement():
    r = predict(preset("tiny-llama"), (16, 16), (8, 8), 32, 4)
    assert r["placement"]["coexist"] and r["parts_s"]["weight_replacement"] == 0.0
    big = predict(preset("llama3-8b"), (660, 660), (360, 360), 2048, 4)
    assert not big["placement"]["coexist"] and big["parts_s"]["weight_replacement"] > 0
    # decode regions are laid out without overlap on the fabric
    origins = [tuple(o) for o in big["placement"]["decode"]["origins"]]
    assert len(set(origins)) == len(origins)


def test_kv_capacity_shift_is_rows_times_concat():
    cap = kv_capacity(preset("llama3-8b"), WSE2, (360, 360))
    assert cap["concat"] == int(cap["exact_shift"] / 360)
    more = kv_capacity(preset("llama3-8b"), WSE2.with_(mem_per_core=64 * 1024), (360, 360))
    assert more["shift"] > cap["shift"]


# ----------------------------------------------------------------------------------------------
# The request timeline and the command
# ----------------------------------------------------------------------------------------------


def test_request_figures_are_consistent():
    n, m = 2048, 16
    r = predict(preset("llama3-8b"), (660, 660), (360, 360), n, m)
    assert r["prefill_tpr"] == pytest.approx(n / r["ttft_s"])
    assert r["decode_tpr"] == pytest.approx(1 / r["tpot_s"])
    assert r["e2e_tpr"] == pytest.approx(m / (r["ttft_s"] + (m - 1) * r["tpot_s"]))
    one = predict(preset("llama3-8b"), (660, 660), (360, 360), n, 1)
    assert one["e2e_tpr"] == pytest.approx(1 / one["ttft_s"])


def test_decode_step_cost_is_affine_in_the_layers():
    import dataclasses

    from llm.cost.estimate import decode_token
    from llm.cost.predict import decode_stages
    from llm.cost.wafer import PhasePlacement, Stage

    c = dataclasses.replace(preset("llama3-8b"), num_layers=5)
    full = decode_token(c, (48, 48), WSE2, context=300).cycles
    one = PhasePlacement("decode", (48, 48), 300, [Stage(0, 5, (48, 48), 0, 0, 0, 0)])
    assert sum(r["cycles"] for r in decode_stages(c, one, WSE2, 300)) == pytest.approx(
        full, rel=1e-12
    )
    # the same layers over two stages of the same mesh and links: the same step
    two = PhasePlacement(
        "decode",
        (48, 48),
        300,
        [Stage(0, 2, (48, 48), 0, 0, 0, 0), Stage(2, 3, (48, 48), 0, 0, 0, 0)],
    )
    assert sum(r["cycles"] for r in decode_stages(c, two, WSE2, 300)) == pytest.approx(
        full, rel=1e-9
    )


KEYS = {
    "ttft_s",
    "prefill_tpr",
    "tpot_s",
    "decode_tpr",
    "e2e_tpr",
    "kv_capacity",
    "stages",
    "cores",
    "fits",
    "violations",
    "wafers",
    "method",
}


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "llm", "estimate", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_estimate_cli_json_keys():
    p = _cli(
        "--preset",
        "llama3-8b",
        "--prefill-mesh",
        "660x660",
        "--decode-mesh",
        "360x360",
        "--prompt-len",
        "2048",
        "--new-tokens",
        "128",
        "--json",
    )
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert KEYS <= r.keys()
    assert set(r["kv_capacity"]) == {"shift", "concat"}
    assert set(r["stages"]) == {"prefill", "decode"}
    assert set(r["cores"]) == {"prefill", "decode", "wafer"}


def test_estimate_help_is_plain_text():
    p = _cli("--help")
    assert p.returncode == 0
    assert "``" not in p.stdout and "--paper-table" in p.stdout


def test_multi_wafer_method_states_that_inter_wafer_links_are_excluded():
    r = predict(preset("qwen2-72b"), (660, 660), (660, 660), 4096, 2)
    assert r["wafers"] > 1 and "inter-wafer links excluded" in r["method"]
    # every decode stage hand-over that leaves a wafer is counted (one wafer per 660 region)
    assert r["inter_wafer_handovers"]["decode_per_token"] == r["stages"]["decode"] - 1
    one = predict(preset("tiny-llama"), (16, 16), (8, 8), 32, 4)
    assert "inter-wafer" not in one["method"]
    assert one["inter_wafer_handovers"] == {"prefill": 0, "decode_per_token": 0}


def test_modeled_wafer_reports_what_estimate_reports():
    from llm.cost.predict import format_modeled_wafer, modeled_wafer

    c = preset("llama3-8b")
    m = modeled_wafer(c, (660, 660), (360, 360), 2048, 128)
    r = predict(c, (660, 660), (360, 360), 2048, 128)
    assert {k: m[k] for k in ("ttft_s", "tpot_s", "decode_tpr", "e2e_tpr")} == {
        k: r[k] for k in ("ttft_s", "tpot_s", "decode_tpr", "e2e_tpr")
    }
    line = format_modeled_wafer(m, "wse2")
    assert f"{r['decode_tpr']:.1f} tok/s" in line and "\n" not in line
    # a request that stopped before its first decode step is priced as one new token
    assert modeled_wafer(c, (660, 660), (360, 360), 2048, 0) == modeled_wafer(
        c, (660, 660), (360, 360), 2048, 1
    )
    bad = modeled_wafer(preset("llama-100m"), (8, 8), (8, 8), 16, 4)
    assert "one layer alone" in bad["error"]
    assert "not placeable" in format_modeled_wafer(bad, "wse2")


def test_estimate_cli_bad_input_is_a_one_line_error():
    p = _cli("--preset", "llama3-8b", "--decode-mesh", "900x900")
    assert p.returncode == 2
    assert "larger than the wse2 fabric" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert _cli("--preset", "nope", "--decode-mesh", "8x8").returncode == 2
