"""The model on the mesh against HF transformers' golden outputs, on any number of ranks.

Greedy tokens must be identical and logits close (atol 1e-4; logits have std ~1.4 and the
reference itself agrees with transformers to ~1e-5). Results must not depend on the rank count,
the virtual mesh or the KV policy.
"""

import numpy as np
import pytest
from goldens import golden
from meshtest import control_plane, greedy_steps, rank_grids, world

from llm.engine.model import MeshModel
from meshrt.collectives import AllreduceSpec
from meshrt.movers import emulations

pytestmark = pytest.mark.mpi

ATOL = 1e-4


def meshes(size):
    """A few decode meshes per rank grid: one core per rank, and uneven blocks."""
    out = []
    for ry, rx in rank_grids(size)[:2]:
        out += [(ry, rx), (2 * ry, 3 * rx), (3 * ry, 2 * rx)]
    return out


def run_model(model, exp, steps=16):
    ids = [int(t) for t in exp["prompt_ids"]]
    model.start(model.capacity_for(len(ids) + steps))
    prompt_logits = []
    logits = None
    for t in ids:
        logits = model.decode(t)
        prompt_logits.append(model.logits_to_host(logits))
    out, step_logits = greedy_steps(model, logits, steps)
    return np.array(prompt_logits), out, step_logits


@pytest.mark.parametrize("name", ["tiny-llama-gqa", "tiny-qwen2"])
@pytest.mark.parametrize("policy", ["shift", "concat"])
def test_mesh_decode_matches_transformers(name, policy):
    config, weights, exp = golden(name)
    comm = world()
    for mesh in meshes(comm.Get_size()):
        model = MeshModel.from_weights(
            config, weights, control_plane(), decode_mesh=mesh, phases=["decode"], kv_policy=policy
        )
        prompt_logits, ids, step_logits = run_model(model, exp)
        np.testing.assert_allclose(
            prompt_logits, exp["prefill_logits"], atol=ATOL, rtol=0, err_msg=f"mesh {mesh}"
        )
        assert ids == [int(t) for t in exp["greedy_ids"]], f"mesh {mesh}"
        np.testing.assert_allclose(step_logits, exp["decode_logits"], atol=ATOL, rtol=0)


def test_allreduce_algorithms_agree():
    config, weights, exp = golden("tiny-llama-gqa")
    comm = world()
    ry, rx = rank_grids(comm.Get_size())[0]
    for algo in ("pipeline", "ring"):
        model = MeshModel.from_weights(
            config,
            weights,
            control_plane(),
            decode_mesh=(2 * ry, 2 * rx),
            phases=["decode"],
            allreduce=AllreduceSpec(algo),
        )
        _, ids, step_logits = run_model(model, exp, steps=4)
        assert ids == [int(t) for t in exp["greedy_ids"][:4]]
        np.testing.assert_allclose(step_logits, exp["decode_logits"][:4], atol=ATOL, rtol=0)


def test_both_emulations_same_tokens_and_ledger():
    config, weights, exp = golden("tiny-qwen2")
    comm = world()
    ry, rx = rank_grids(comm.Get_size())[-1]
    ledgers = {}
    for emulation in emulations():
        model = MeshModel.from_weights(
            config,
            weights,
            control_plane(),
            decode_mesh=(4 * ry, 2 * rx),
            phases=["decode"],
            emulation=emulation,
        )
        prompt_logits, ids, _ = run_model(model, exp, steps=6)
        assert ids == [int(t) for t in exp["greedy_ids"][:6]]
        np.testing.assert_allclose(prompt_logits, exp["prefill_logits"], atol=ATOL, rtol=0)
        ledgers[emulation] = {ph: f.ledger.summary() for ph, f in model.fabrics.items()}
    assert ledgers["exact"] == ledgers["aggregated"]
