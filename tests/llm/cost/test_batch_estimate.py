"""``llm estimate --batch``: B requests per decode step on the wafer, in closed form."""

import json

import pytest
from faultcase import run

from llm.cost.batch import batch_decode
from llm.cost.predict import decode_stages, decode_tpr
from llm.cost.wafer import kv_capacity, place_decode, stage_transfers
from llm.modeling.config import preset
from meshrt.collectives import KTREE
from meshrt.plmr import get_device


@pytest.mark.parametrize("name", ["llama3-8b", "qwen2-72b"])
def test_one_request_is_the_paper_decode_figure(name):
    config = preset(name)
    one = batch_decode(config, (420, 420), 1, 4096)
    assert one["tpr_per_request"] == pytest.approx(decode_tpr(config, (420, 420), "wse2", 4096))
    assert one["total_tokens_per_s"] == one["tpr_per_request"]


def test_batching_trades_per_request_rate_for_total_rate_and_cache():
    config = preset("llama3-8b")
    kv = kv_capacity(config, get_device("wse2"), (420, 420))["shift"]
    rows = [batch_decode(config, (420, 420), b, 2048) for b in (1, 2, 8, 64)]
    totals = [r["total_tokens_per_s"] for r in rows]
    rates = [r["tpr_per_request"] for r in rows]
    assert totals == sorted(totals) and rates == sorted(rates, reverse=True)
    # a step of B costs less than B steps: hops, routing and task switches paid once
    assert rows[2]["step_s"] < 8 * rows[0]["step_s"]
    assert [r["kv_capacity_per_request"] for r in rows] == [kv // b for b in (1, 2, 8, 64)]
    assert rows[0]["kv_fits"] and not rows[-1]["kv_fits"]


def _estimate(*args):
    return run(["estimate", *args], timeout=120)[0]


def test_estimate_batch_and_batch_sweep_on_the_command_line():
    p = _estimate("--preset", "llama3-8b", "--decode-mesh", "420x420", "--batch", "8", "--json")
    assert p.returncode == 0, p.stderr
    b = json.loads(p.stdout)["batch"]
    assert b["batch"] == 8 and b["total_tokens_per_s"] == pytest.approx(8 * b["tpr_per_request"])
    p = _estimate("--preset", "llama3-8b", "--batch-sweep", "1,4,16", "--json")
    assert p.returncode == 0, p.stderr
    rows = json.loads(p.stdout)
    assert [r["batch"] for r in rows] == [1, 4, 16] and rows[0]["decode_mesh"] == [420, 420]
    p = _estimate("--preset", "llama3-8b", "--batch-sweep", "1,4")
    assert p.returncode == 0 and "total tok/s" in p.stdout and len(p.stdout.splitlines()) == 3
    for bad in (["--batch-sweep", "0,2"], ["--batch-sweep", "x"], ["--batch", "-1"]):
        p = _estimate("--preset", "llama3-8b", "--decode-mesh", "420x420", *bad)
        assert p.returncode == 2 and p.stderr.startswith("error:"), (bad, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1


def test_stage_hand_overs_carry_every_sequence_of_the_batch():
    # LLaMA2-13B decode needs several stages on 420x420: a batched step hands B Y-vectors from
    # each stage's region to the next, so the hand-over words grow B-fold (hops do not)
    config, device, mesh = preset("llama2-13b"), get_device("wse2"), (420, 420)
    pl = place_decode(config, device, mesh, 4096)
    assert len(pl.stages) > 1
    one, eight = stage_transfers(pl, config, 1), stage_transfers(pl, config, 8)
    assert [t["words"] for t in eight] == [8 * t["words"] for t in one]
    assert [t["hops"] for t in eight] == [t["hops"] for t in one]

    def hand_overs_s(batch):
        rows = decode_stages(config, pl, device, 4096, "shift", 0, KTREE, batch)
        step = batch_decode(config, mesh, batch, 4096)["step_s"]
        return step - device.seconds(sum(r["cycles"] for r in rows))

    words = sum(t["words"] for t in one)
    assert hand_overs_s(8) - hand_overs_s(1) == pytest.approx(
        device.seconds(7 * words * device.wavelet_cycles)
    )
