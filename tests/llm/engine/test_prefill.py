"""Prefill on the mesh against HF transformers' golden outputs, and the hand-off to decode.

Every prompt logit must be close to transformers' (atol 1e-4), and greedy decoding after the
mesh prefill must reproduce the golden tokens and logits, whatever the rank count, the two
virtual meshes (equal, different shapes, prefill larger than decode) and the KV policy. The
data plane stays neighbour-only and the closed-form estimate equals the ledger.
"""

import numpy as np
import pytest
from goldens import golden
from meshtest import assert_neighbour_only, control_plane, greedy_steps, rank_grids, world

from llm.cost import estimate as E
from llm.engine.kvcache import ContextFullError
from llm.engine.model import MeshModel
from llm.modeling.config import preset

pytestmark = pytest.mark.mpi

ATOL = 1e-4
NAMES = ["tiny-llama-gqa", "tiny-qwen2"]


def pairs(size):
    """(prefill mesh, decode mesh) pairs: equal meshes, different shapes, prefill larger."""
    grids = rank_grids(size)
    out = []
    for ry, rx in (grids[0], grids[-1]) if len(grids) > 1 else grids:
        out += [
            ((ry, rx), (ry, rx)),
            ((2 * ry, 3 * rx), (3 * ry, 2 * rx)),
            ((2 * ry, 2 * rx), (ry, rx)),
        ]
    return out


def model_for(config, weights, prefill_mesh, decode_mesh, policy="shift", trace=True):
    model = MeshModel.from_weights(
        config,
        weights,
        control_plane(),
        decode_mesh=decode_mesh,
        prefill_mesh=prefill_mesh,
        kv_policy=policy,
    )
    if trace:
        for fab in model.fabrics.values():
            fab.trace = []
    return model


def prompt(exp):
    return [int(t) for t in exp["prompt_ids"]]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("policy", ["shift", "concat"])
def test_prefill_then_decode_matches_transformers(name, policy):
    config, weights, exp = golden(name)
    ids = prompt(exp)
    steps = len(exp["greedy_ids"])
    todo = pairs(world().Get_size())
    if policy == "concat":  # the hand-off is the same; decode differs from the second token
        todo = todo[1:3]
    for pm, dm in todo:
        model = model_for(config, weights, pm, dm, policy)
        model.start(model.capacity_for(len(ids) + steps))
        logits, every = model.prefill(ids, all_logits=True)
        where = f"prefill {pm}, decode {dm}"
        np.testing.assert_allclose(every, exp["prefill_logits"], atol=ATOL, rtol=0, err_msg=where)
        np.testing.assert_allclose(
            model.logits_to_host(logits),
            exp["prefill_logits"][-1],
            atol=ATOL,
            rtol=0,
            err_msg=where,
        )
        out, step_logits = greedy_steps(model, logits, steps)
        assert out == [int(t) for t in exp["greedy_ids"]], where
        np.testing.assert_allclose(
            step_logits, exp["decode_logits"], atol=ATOL, rtol=0, err_msg=where
        )
        for fab in model.fabrics.values():
            assert_neighbour_only(fab)
            if fab.nranks == 1:
                assert fab.trace == []


def _cache_in_order(model):
    """This rank's cached K and V, per layer, in logical token order (local rows only)."""
    cache = model.decoder.cache
    rows = list(model.decode_fabric.index(0))
    out = []
    for layer in range(len(cache.k)):
        ks, vs = [], []
        for r, slot in cache.order():
            if r in rows:
                ks.append(cache.k[layer][rows.index(r), :, slot])
                vs.append(cache.v[layer][rows.index(r), :, slot])
        out.append((np.array(ks), np.array(vs)))
    return out


@pytest.mark.parametrize("name", NAMES)
def test_handed_off_cache_equals_the_decoded_prompt(name):
    """The K/V re-laid-out from the prefill mesh are the decode path's own, slot for slot."""
    config, weights, exp = golden(name)
    ids = prompt(exp)
    pm, dm = pairs(world().Get_size())[1]
    a = model_for(config, weights, pm, dm)
    a.start(a.capacity_for(len(ids) + 1))
    a.prefill(ids)
    b = model_for(config, weights, pm, dm)
    b.prefiller = None  # the prompt through decode steps
    b.start(b.capacity_for(len(ids) + 1))
    b.prefill(ids)
    np.testing.assert_array_equal(a.decoder.cache.count, b.decoder.cache.count)
    for (ka, va), (kb, vb) in zip(_cache_in_order(a), _cache_in_order(b)):
        np.testing.assert_allclose(ka, kb, atol=1e-5, rtol=0)
        np.testing.assert_allclose(va, vb, atol=1e-5, rtol=0)


def test_short_prompt_padding_changes_nothing():
    """A prefix of the prompt (more padding rows) gives the prefix's golden logits."""
    config, weights, exp = golden("tiny-llama-gqa")
    for pm, dm in pairs(world().Get_size())[1:3]:
        for n in (1, 5):
            model = model_for(config, weights, pm, dm, trace=False)
            model.start(model.capacity_for(n + 1))
            _, every = model.prefill(prompt(exp)[:n], all_logits=True)
            np.testing.assert_allclose(every, exp["prefill_logits"][:n], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_estimate_equals_ledger(name):
    config, weights, exp = golden(name)
    ids = prompt(exp)
    for k, (pm, dm) in enumerate(pairs(world().Get_size())[:3]):
        model = model_for(config, weights, pm, dm, trace=False)
        model.start(model.capacity_for(len(ids) + 1))
        for led in model.ledgers().values():
            led.reset()
        every = k == 1
        out = model.prefill(ids, all_logits=every)
        model.pick(out[0] if every else out)
        led = model.fabrics["prefill"].ledger
        est = E.prefill(config, pm, len(ids), decode_mesh=dm, ids=ids, all_logits=every)
        assert led.ops.keys() == est.ops.keys()
        for op in led.ops:
            assert led.ops[op] == est.ops[op], op
        assert (led.peak_memory, led.max_routes, led.io_bytes) == (
            est.peak_memory,
            est.max_routes,
            est.io_bytes,
        )
        dled = model.decode_fabric.ledger
        first = E.first_token(config, dm)
        assert dled.ops == first.ops
        assert dled.io_bytes == first.io_bytes


def test_paper_scale_ttft():
    """LLaMA3-8B, 2048 prompt tokens, prefill on 660x660 and decode on 360x360 (WSE-2)."""
    r = E.ttft(preset("llama3-8b"), (660, 660), 2048, decode_mesh=(360, 360))
    led = r["prefill_ledger"]
    assert 0 < r["seconds"] < 1 and not r["violations"]
    assert led.ops["layer0/qkv/step"].steps == 660
    assert led.ops["layer31/scores/step"].steps == 660
    assert led.max_routes <= 24
    switches = sum(x.totals().activations for x in (led, r["first_token_ledger"]))
    assert (
        r["comm_cycles"] + r["compute_cycles"] + switches * led.device.task_switch
        >= r["cycles"]
        > 0
    )


def test_prompt_longer_than_the_cache_is_refused():
    config, weights, exp = golden("tiny-qwen2")
    pm, dm = pairs(world().Get_size())[0]
    model = model_for(config, weights, pm, dm, policy="concat", trace=False)
    model.start(2)
    with pytest.raises(ContextFullError, match="capacity"):
        model.prefill(prompt(exp))
