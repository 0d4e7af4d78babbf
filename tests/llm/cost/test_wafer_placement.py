"""One placement: folded regions, remainder stages, the paper's set-ups on one wafer, and every
command reporting the same figures for the same configuration."""

import json
import subprocess
import sys

import pytest

from llm.cost.predict import modeled_wafer, predict
from llm.cost.regions import Fabric, Fold, fold_coordinates, fold_options, link_hops
from llm.cost.wafer import PlacementError, kv_capacity, place, place_decode
from llm.modeling.config import preset
from meshrt.mesh import X, Y
from meshrt.plmr import WSE2, get_device

# ----------------------------------------------------------------------------------------------
# Folding a logical mesh onto a rectangle
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mesh", [(3, 4), (4, 6), (5, 7), (6, 5), (2, 9)])
@pytest.mark.parametrize("fold", fold_options())
def test_fold_is_a_one_to_one_map_into_its_region_with_the_closed_form_hops(mesh, fold):
    rows, cols = fold_coordinates(mesh, fold)
    h, w = fold.shape(mesh)
    assert rows.min() >= 0 and cols.min() >= 0 and rows.max() < h and cols.max() < w
    assert len(set(zip(rows.ravel().tolist(), cols.ravel().tolist()))) == mesh[0] * mesh[1]
    measured = link_hops(mesh, fold)
    ly, lx = fold.links
    # a logical link is never longer than the closed form; it reaches it when the axis has links
    assert measured[0] == (ly if mesh[0] > 1 else 1) and measured[1] == (lx if mesh[1] > 1 else 1)


def test_fold_by_two_is_the_design_example():
    # columns c < Px/2 stay, c >= Px/2 go to Px-1-c one row down: row links 1 hop, column 2
    rows, cols = fold_coordinates((3, 8), Fold(2, X))
    assert cols[0].tolist() == [0, 1, 2, 3, 3, 2, 1, 0]
    assert rows[0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1] and rows[1, 0] == 2
    assert Fold(2, X).shape((420, 420)) == (840, 210) and Fold(2, X).links == (2, 1)
    assert Fold(3, Y).shape((420, 420)) == (140, 1260) and Fold(3, Y).links == (1, 3)


def test_fabric_packs_three_420_stages_as_the_design_says():
    fab = Fabric(994, 750)
    regions = [fab.place((420, 420)) for _ in range(3)]
    assert [r.fold for r in regions[:2]] == [Fold(), Fold()]
    assert regions[2].fold == Fold(2, X) and (regions[2].height, regions[2].width) == (840, 210)
    cells = set()
    for r in regions:  # no two regions overlap, all inside the wafer
        assert r.y + r.height <= 994 and r.x + r.width <= 750
        block = {
            (y, x) for y in range(r.y, r.y + r.height, 10) for x in range(r.x, r.x + r.width, 10)
        }
        assert not cells & block
        cells |= block


def test_folded_links_cost_alpha_per_hop_on_the_axis_they_cross():
    from llm.cost.estimate import decode_token

    c = preset("llama3-8b")
    flat = decode_token(c, (60, 60), WSE2, context=64)
    for links in ((2, 1), (1, 2), (3, 1)):
        folded = decode_token(c, (60, 60), WSE2, context=64, links=links)
        assert folded.cycles > flat.cycles
        # exactly alpha per extra hop: the same ledger with alpha scaled on the links' axis
        assert folded.totals().compute_cycles == pytest.approx(flat.totals().compute_cycles)
    # an unfolded region prices as the emulator's mesh
    assert decode_token(c, (60, 60), WSE2, context=64, links=(1, 1)).cycles == flat.cycles


# ----------------------------------------------------------------------------------------------
# The paper's set-ups
# ----------------------------------------------------------------------------------------------

ONE_WAFER_DECODE = [(m, s) for m in ("llama3-8b", "llama2-13b") for s in (360, 375, 420, 540, 660)]


@pytest.mark.parametrize("model,side", ONE_WAFER_DECODE)
def test_the_papers_one_wafer_decode_meshes_place_on_one_wafer(model, side):
    pl = place_decode(preset(model), WSE2, (side, side), 4096)
    assert pl.wafers == 1 and pl.method == "placed"
    assert sum(s.layers for s in pl.stages) == preset(model).num_layers
    assert pl.stage_cores <= WSE2.cores_x * WSE2.cores_y
    assert all(s.free_bytes >= 0 for s in pl.stages)


@pytest.mark.parametrize("model,pmesh,dmesh", [("llama3-8b", 660, 360), ("llama2-13b", 750, 375)])
@pytest.mark.parametrize("prompt,new", [(2048, 128), (4096, 128), (2048, 2048), (4096, 4096)])
def test_the_end_to_end_setups_place_on_one_wafer(model, pmesh, dmesh, prompt, new):
    r = predict(preset(model), (pmesh, pmesh), (dmesh, dmesh), prompt, new)
    assert r["wafers"] == 1 and r["fits"], r["violations"]


def test_13b_on_540_runs_remainder_stages_and_says_so():
    pl = place_decode(preset("llama2-13b"), WSE2, (540, 540), 4096)
    assert pl.wafers == 1 and pl.remainder
    named = [s for s in pl.stages if not s.remainder]
    rest = [s for s in pl.stages if s.remainder]
    assert named and all(s.mesh == (540, 540) for s in named)
    assert rest and all(s.mesh[0] == s.mesh[1] < 540 for s in rest)
    assert "remainder stage" in pl.stages[-1].describe()
    # each stage's layers are priced at its own mesh: not the time of 40 layers on 540x540
    from llm.cost.predict import decode_tpr

    assert decode_tpr(preset("llama2-13b"), (540, 540), WSE2) > 0


def test_13b_prefill_on_750_streams_the_layers_its_stage_cannot_hold():
    from llm.cost.predict import ttft_cycles
    from llm.cost.wafer import place_phase, stream_cycles

    c = preset("llama2-13b")
    pl = place_phase(c, WSE2, (750, 750), "prefill", 2048, 2048)
    assert pl.wafers == 1 and len(pl.stages) == 1
    (stage,) = pl.stages
    assert stage.streamed > 0 and stage.layers + stage.streamed == c.num_layers
    assert stage.free_bytes >= 0 and pl.store_cores > 0
    assert "streamed in" in stage.describe()
    # a streamed layer costs at least its compute and at least the stream of its weights
    resident = type(pl)(
        pl.phase,
        pl.mesh,
        pl.kv_tokens,
        [type(stage)(0, c.num_layers, stage.mesh, 0, 0, 0, 0, region=stage.region)],
    )
    with_stream, _ = ttft_cycles(c, pl, (375, 375), 2048, WSE2)
    all_resident, _ = ttft_cycles(c, resident, (375, 375), 2048, WSE2)
    assert with_stream >= all_resident
    from llm.cost.wafer import layer_weight_words

    # the layer's weight elements cross the 750-core side, one per link per cycle
    words = layer_weight_words(c, (750, 750)) * 750 * 750
    assert stream_cycles(c, WSE2, stage) == pytest.approx(words / 750 + 994)


@pytest.mark.parametrize("model", ["codellama-34b", "qwen2-72b"])
@pytest.mark.parametrize("side", [420, 540, 660])
def test_34b_and_72b_need_more_than_one_wafer(model, side):
    pl = place_decode(preset(model), WSE2, (side, side), 4096)
    assert pl.wafers > 1 and pl.method == "layer-subset"


def test_kv_capacity_is_the_calibration_point_on_one_wafer():
    cap = kv_capacity(preset("llama3-8b"), WSE2, (360, 360))
    assert (cap["shift"], cap["concat"], cap["wafers"]) == (137548, 382, 1)


# ----------------------------------------------------------------------------------------------
# Every command, the same figures
# ----------------------------------------------------------------------------------------------


def _llm(*args, timeout=120):
    p = subprocess.run(
        [sys.executable, "-m", "llm", *args], capture_output=True, text=True, timeout=timeout
    )
    return p


GRID = [
    ("llama3-8b", "420x420", "420x420", "wse2"),
    ("llama2-13b", "750x750", "375x375", "wse2"),
    ("llama3-8b", "660x660", "360x360", "wse3"),
    ("qwen2-72b", "720x720", "540x540", "wse2"),
]


@pytest.mark.parametrize("model,pmesh,dmesh,device", GRID)
def test_plan_estimate_and_bench_agree(model, pmesh, dmesh, device):
    from llm.cost.memory_budget import memory_budget
    from llm.serve.bench import full_model_estimate
    from meshrt.collectives import KTREE

    c, dev = preset(model), get_device(device)
    pm, dm = (tuple(int(v) for v in m.split("x")) for m in (pmesh, dmesh))
    est = _llm(
        "estimate",
        "--preset",
        model,
        "--prefill-mesh",
        pmesh,
        "--decode-mesh",
        dmesh,
        "--prompt-len",
        "2048",
        "--new-tokens",
        "2048",
        "--device",
        device,
        "--json",
    )
    assert est.returncode == 0, est.stderr
    e = json.loads(est.stdout)
    plan = memory_budget(c, dm, pm, device, 4096)
    bench = full_model_estimate(c, dm, dev, 4096, 2048, "shift", KTREE, prefill_mesh=pm)
    assert (
        plan["kv_capacity"]["shift"] == e["kv_capacity"]["shift"] == bench["kv_capacity"]["shift"]
    )
    assert plan["kv_capacity"]["concat"] == e["kv_capacity"]["concat"]
    assert plan["wafers"] == e["wafers"] == bench["wafers"]
    assert plan["phases"]["decode"]["stages"] == e["stages"]["decode"] == bench["stages"]["decode"]
    assert plan["coexist"] == e["placement"]["coexist"]
    for k in ("ttft_s", "tpot_s", "decode_tpr", "e2e_tpr"):
        assert bench[k] == pytest.approx(e[k], rel=1e-12)
    assert modeled_wafer(c, pm, dm, 2048, 2048, dev) == bench


def test_bench_prints_the_estimate_figures():
    # llm bench's full-model line equals llm estimate for the same model, meshes and lengths
    b = _llm(
        "bench",
        "--preset",
        "llama-100m",
        "--layers",
        "1",
        "--decode-mesh",
        "64x64",
        "--prefill-mesh",
        "64x64",
        "--prompt-len",
        "8",
        "--new-tokens",
        "3",
        "--repeat",
        "1",
        "--warmup",
        "0",
        "--json",
        timeout=300,
    )
    assert b.returncode == 0, b.stderr
    got = json.loads(b.stdout)["full_model_estimate"]
    e = _llm(
        "estimate",
        "--preset",
        "llama-100m",
        "--prefill-mesh",
        "64x64",
        "--decode-mesh",
        "64x64",
        "--prompt-len",
        "8",
        "--new-tokens",
        "3",
        "--json",
    )
    assert e.returncode == 0, e.stderr
    want = json.loads(e.stdout)
    for k in ("ttft_s", "tpot_s", "decode_tpr", "e2e_tpr", "kv_capacity", "stages", "wafers"):
        assert got[k] == (
            pytest.approx(want[k], rel=1e-12) if k.endswith(("_s", "_tpr")) else want[k]
        )


@pytest.mark.parametrize("cmd", ["plan", "estimate", "bench"])
def test_a_mesh_larger_than_the_wafer_is_one_error_line(cmd):
    p = _llm(
        cmd, "--preset", "llama3-8b", "--decode-mesh", "1000x1000", "--prefill-mesh", "420x420"
    )
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    err = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "1000x1000" in err[0] and "994x750" in err[0], p.stderr


def test_placement_errors_name_what_is_missing():
    with pytest.raises(PlacementError, match="one layer alone needs"):
        place(preset("llama3-8b"), WSE2, (16, 16), (16, 16), 8, 8)
