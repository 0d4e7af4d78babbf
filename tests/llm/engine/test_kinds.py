"""Op kinds: one cost per kind, charged by the emulator and the estimator alike.

The estimator-equals-emulator tests (test_estimate.py, test_prefill.py) tie the two on emulated
meshes; here, without MPI: a layer program priced for every layer by replaying layer 0's tape
writes exactly what pricing each layer live writes, on square and folded regions; every kind
of the programs has its cost object; a folded region stretches only the traffic along its
longer links.
"""

import pytest

from llm.engine import program as P
from llm.engine.kinds import KINDS, OpKind, Site, charge, charge_layers
from llm.modeling.config import preset
from llm.placement.layout import PhaseLayout
from meshrt.collectives import KTREE, AllreduceSpec
from meshrt.mesh import X
from meshrt.plmr import WSE2, Ledger


def _layer_cases():
    config = preset("tiny-llama")
    lay = PhaseLayout(config, 2, 3)
    shifting = P.Pass(fill=4, shifts=True, capacity=6, token_col=1)
    yield "decode", lay, P.decode_head(lay), P.decode_layer(lay), shifting
    yield (
        "decode-batch",
        lay,
        P.decode_head(lay),
        P.decode_layer(lay, 3),
        P.Pass(fill=9, shifts=2, capacity=18, token_cols=(0, 2, 1)),
    )
    ids = tuple(range(3, 14))
    yield "prefill", lay, P.prefill_head(lay, 11), P.prefill_layer(lay, 11), P.Pass(ids=ids)


@pytest.mark.parametrize("links", [(1, 1), (2, 1), (1, 3)])
@pytest.mark.parametrize("case", list(_layer_cases()), ids=lambda c: c[0])
def test_charge_layers_writes_what_pricing_every_layer_writes(case, links):
    _, lay, head, layer, run = case
    dev = WSE2.with_(task_switch=41.0)
    for spec in (KTREE, AllreduceSpec("ring")):
        site = Site(lay, spec, run)
        live, taped = Ledger(dev), Ledger(dev)
        for led in (live, taped):
            charge(head, led, site, links)
        for i in range(5):
            with live.section(f"layer{i}"):
                charge(layer, live, site, links)
        charge_layers(layer, 5, taped, site, links)
        assert list(taped.ops) == list(live.ops) and taped.ops == live.ops
        assert taped.summary() == live.summary() and taped.kernel == live.kernel
        assert "layer4/qkv/task_switch" in taped.ops


def test_every_kind_of_the_programs_has_a_cost_and_free_kinds_write_nothing():
    lay = PhaseLayout(preset("tiny-llama"), 2, 2)
    ops = (
        P.decode_head(lay)
        + P.decode_layer(lay)
        + P.decode_logits(lay)
        + P.decode_pick(lay)
        + P.prefill_head(lay, 5)
        + P.prefill_layer(lay, 5)
        + P.prefill_all_logits(lay, 5)
    )
    assert {op.kind for op in ops} == set(KINDS)
    assert all(type(k) is not OpKind or name in ("add", "vocab_mask") for name, k in KINDS.items())
    run = P.Pass(fill=3, shifts=True, capacity=4, ids=(1, 2, 3, 4, 5))
    for op in ops:
        led = Ledger()
        KINDS[op.kind].cost(op, led, Site(lay, KTREE, run))
        free = op.kind in ("add", "vocab_mask")
        assert (not led.ops and not led.io_bytes) == free, op.kind
        assert all(name.startswith(op.name) for name in led.ops if "task_switch" not in name)


def test_a_fold_stretches_only_the_traffic_along_its_long_links():
    """Links twice as long along x: the GEMVs reducing along x and the reductions along x
    pay twice the hop latency; those along y, and local work, are priced as unfolded."""
    lay = PhaseLayout(preset("tiny-llama"), 2, 2)
    run = P.Pass(fill=3)
    layer = P.decode_layer(lay)
    flat, folded = Ledger(), Ledger()
    charge(layer, flat, Site(lay, KTREE, run))
    charge(layer, folded, Site(lay, KTREE, run), (1, 2))
    by_op = {op.name: op for op in layer}
    changed = {k.split("/")[0] for k in flat.ops if flat.ops[k] != folded.ops[k]}
    for name in changed:
        op = by_op[name]
        along_x = op.axis == 1 or getattr(op.dims, "input_axis", None) == X
        assert along_x, name
    assert {"o", "down", "scores"} <= changed
    assert not changed & {"qkv", "gate_up", "attn_norm", "rope", "swiglu", "pv"}
