"""The closed-form decode estimate equals the ledger of an emulated decode step."""

import pytest
from goldens import FIXTURES
from meshtest import control_plane, rank_grids, world

from llm.cost.estimate import decode_batch_step, decode_token, decode_weight_words
from llm.engine.model import MeshModel
from llm.modeling.config import preset
from llm.storage.checkpoint import load_checkpoint

pytestmark = pytest.mark.mpi


@pytest.mark.parametrize("name", ["tiny-llama-gqa", "tiny-qwen2"])
@pytest.mark.parametrize("policy", ["shift", "concat"])
def test_decode_estimate_equals_ledger(name, policy):
    config, weights = load_checkpoint(FIXTURES / name)
    comm = world()
    ry, rx = rank_grids(comm.Get_size())[-1]
    for mesh in ((ry, rx), (2 * ry, 3 * rx)):
        model = MeshModel.from_weights(
            config, weights, control_plane(), decode_mesh=mesh, phases=["decode"], kv_policy=policy
        )
        cap = 9
        model.start(cap)
        ids = [3, 5, 7, 9, 11, 13, 4]
        for t in ids[:-1]:
            model.decode(t)
        led = model.decode_fabric.ledger
        led.reset()
        model.start(cap)  # same cache size; replay to the same point, pricing only the last
        for t in ids[:-1]:
            model.decode(t)
        led.reset()
        model.pick(model.decode(ids[-1]))
        col = ids[-1] // (model.phase_layouts["decode"].vocab // mesh[1])
        est = decode_token(
            config, mesh, context=len(ids), policy=policy, token_col=col, kv_capacity=cap
        )
        assert led.ops.keys() == est.ops.keys()
        for k in led.ops:
            assert led.ops[k] == est.ops[k], k
        assert led.max_routes == est.max_routes


@pytest.mark.parametrize("name", ["tiny-llama-gqa", "tiny-qwen2"])
@pytest.mark.parametrize("policy", ["shift", "concat"])
def test_batched_decode_estimate_equals_ledger(name, policy):
    """A step of B sequences (caches of different fills, some shifting) against the closed
    form: the same records, the same figures."""
    config, weights = load_checkpoint(FIXTURES / name)
    ry, rx = rank_grids(world().Get_size())[-1]
    histories = [[3, 5, 7, 9, 11], [2], [8, 6, 4, 2, 1, 9, 10, 12], [14, 15]]
    nxt = [13, 30, 3, 70]
    for mesh in ((ry, rx), (2 * ry, 3 * rx)):
        model = MeshModel.from_weights(
            config, weights, control_plane(), decode_mesh=mesh, phases=["decode"], kv_policy=policy
        )
        cap = 9
        seqs = [model.open_sequence(cap) for _ in histories]
        for seq, ids in zip(seqs, histories):
            for t in ids:
                model.decode_sequences([seq], [t])
        led = model.decode_fabric.ledger
        for batch in (len(seqs), 2):
            led.reset()
            model.pick_sequences(model.decode_sequences(seqs[:batch], nxt[:batch]), [None] * batch)
            vseg = model.phase_layouts["decode"].vocab // mesh[1]
            est = decode_batch_step(
                config,
                mesh,
                [s.position for s in seqs[:batch]],
                policy=policy,
                token_cols=[t // vseg for t in nxt[:batch]],
                kv_capacity=cap * batch,
            )
            assert led.ops.keys() == est.ops.keys()
            for k in led.ops:
                assert led.ops[k] == est.ops[k], k
            assert led.max_routes == est.max_routes
            assert led.io_bytes == est.io_bytes
            if batch == len(seqs):  # caches that move and caches that do not, in one step
                shifting = sum(len(h) % mesh[0] != 0 for h in histories)
                assert ("layer0/kv_append/shift" in est.ops) == (policy == "shift" and shifting > 0)


def test_batch_of_one_prices_as_one_token():
    config, _ = load_checkpoint(FIXTURES / "tiny-llama-gqa")
    one = decode_token(config, (2, 3), context=5, token_col=1, kv_capacity=4)
    batch = decode_batch_step(config, (2, 3), [5], token_cols=[1], kv_capacity=4)
    assert one.ops == batch.ops and one.cycles == batch.cycles


def test_batch_step_shares_the_per_step_costs():
    """B sequences cost less than B steps (hops, routing and task switches paid once) but more
    than one (words and MACs grow with B)."""
    config, _ = load_checkpoint(FIXTURES / "tiny-llama-gqa")
    one = decode_token(config, (4, 4), context=8).cycles
    eight = decode_batch_step(config, (4, 4), [8] * 8).cycles
    assert one < eight < 8 * one


def test_resident_memory_matches_blocks():
    config, weights = load_checkpoint(FIXTURES / "tiny-qwen2")
    comm = world()
    ry, rx = rank_grids(comm.Get_size())[0]
    mesh = (3 * ry, 2 * rx)
    model = MeshModel.from_weights(
        config, weights, control_plane(), decode_mesh=mesh, phases=["decode"]
    )
    model.start(4)
    fab = model.decode_fabric
    per_core = sum(b.size for b in model.blocks["decode"].values()) / (fab.by * fab.bx)
    assert per_core == decode_weight_words(config, mesh)


def test_layer_pipeline_when_one_mesh_cannot_hold_the_weights():
    from llm.cost.memory_budget import memory_budget
    from meshrt.plmr import WSE2

    p = memory_budget(preset("llama2-13b"), decode_mesh=(375, 375), prefill_mesh=(375, 375))
    d = p["phases"]["decode"]
    assert d["fits"] and d["stages"] == 5 and d["wafers"] == 1
    assert max(d["weight_bytes_per_core"]) <= WSE2.mem_per_core
    assert d["cores"] == 5 * 375 * 375
    small = memory_budget(preset("tiny-llama"), decode_mesh=(8, 8))["phases"]["decode"]
    assert small["fits"] and small["stages"] == 1
