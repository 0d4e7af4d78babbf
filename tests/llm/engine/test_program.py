"""The layer program: one op list per phase, executed by the emulator, priced by the estimator.

The estimator-equals-ledger tests (test_estimate.py, test_prefill.py) run these programs on
emulated meshes; here: the programs use every op kind, every ledger record belongs to exactly
one op, and a non-finite value is caught and traced to the first layer that produced it.
"""

import numpy as np
import pytest
from goldens import FIXTURES
from meshtest import control_plane, rank_grids, world

from llm.cost import estimate as E
from llm.engine import program as P
from llm.engine.decode import NonFiniteError
from llm.engine.handoff import Handoff
from llm.engine.kinds import KINDS
from llm.engine.model import MeshModel
from llm.modeling.config import preset
from llm.placement.layout import PhaseLayout
from llm.storage.checkpoint import load_checkpoint
from meshrt.collectives import AllreduceSpec


def _programs(config, mesh, tokens):
    lay = PhaseLayout(config, *mesh)
    return {
        "decode": (
            P.decode_head(lay),
            P.decode_layer(lay),
            P.decode_logits(lay) + P.decode_pick(lay),
        ),
        "prefill": (
            P.prefill_head(lay, tokens),
            P.prefill_layer(lay, tokens),
            P.prefill_all_logits(lay, tokens),
        ),
    }


def _owner(key: str, head: list, layer: list, tail: list) -> str:
    """The op whose name prefixes ledger record ``key`` (layer ops under ``layer{i}/``)."""
    first, _, rest = key.partition("/")
    ops = layer if first.startswith("layer") and first[5:].isdigit() else head + tail
    name = rest.partition("/")[0] if ops is layer else first
    owners = [op for op in ops if op.name == name]
    assert len(owners) == 1, f"ledger record {key!r} has owners {owners}"
    return owners[0].kind


def test_programs_use_every_kind_and_own_every_ledger_record():
    config = preset("tiny-llama")
    mesh, tokens = (2, 3), 11
    progs = _programs(config, mesh, tokens)
    kinds = {op.kind for parts in progs.values() for part in parts for op in part}
    assert kinds == set(KINDS)
    for parts in progs.values():
        for part in parts:
            assert len({op.name for op in part}) == len(part)  # one ledger name per op
    free = {"add", "vocab_mask", "prompt_logits"}  # no records (I/O only)
    dec = E.decode_token(config, mesh, context=6, policy="shift")  # 5 before: shifts
    seen = {_owner(k, *progs["decode"]) for k in dec.ops}
    assert seen == {op.kind for part in progs["decode"] for op in part} - free
    pre = E.prefill(config, mesh, tokens, all_logits=True)
    keys = [k for k in pre.ops if not k.startswith("handoff/")]
    seen = {_owner(k, *progs["prefill"]) for k in keys}
    assert seen == {op.kind for part in progs["prefill"] for op in part} - free
    assert any(k.startswith("layer0/kv_append/shift") for k in dec.ops)


def test_price_refuses_an_unknown_kind():
    with pytest.raises(ValueError, match="unknown op kind"):
        P.Op("conv2d", "x")


def test_handoff_cost_names_and_spec():
    config = preset("tiny-llama")
    pl, dl = PhaseLayout(config, 4, 4), PhaseLayout(config, 2, 3)
    ring = Handoff(pl, dl, 9, AllreduceSpec("ring")).cost()
    tree = Handoff(pl, dl, 9).cost()
    assert list(ring)[:3] == list(tree)[:3] == ["handoff/weights", "handoff/kv/x", "handoff/kv/y"]
    assert "handoff/hidden/gather" in ring and "handoff/hidden/gather/level1" in tree
    assert ring["handoff/hidden/gather"].count == 2 * (4 - 1)
    assert tree["handoff/kv/y"].hops > 0 and int(Handoff(pl, dl, 9).dst_rows.sum()) == 9
    with pytest.raises(ValueError, match="empty"):
        Handoff(pl, dl, 0)


@pytest.mark.mpi
@pytest.mark.parametrize("layer,phases", [(1, ["decode"]), (0, ["decode", "prefill"])])
def test_non_finite_logits_name_the_first_bad_layer(layer, phases):
    config, weights = load_checkpoint(FIXTURES / "tiny-llama-gqa")
    comm = world()
    ry, rx = rank_grids(comm.Get_size())[-1]
    poisoned = dict(weights)
    name = f"model.layers.{layer}.mlp.down_proj.weight"
    w = np.array(weights[name], dtype=np.float32)
    w[3, 5] = np.nan
    poisoned[name] = w
    model = MeshModel.from_weights(
        config,
        poisoned,
        control_plane(),
        decode_mesh=(ry, 2 * rx),
        prefill_mesh=(2 * ry, rx),
        phases=phases,
    )
    model.start(8)
    with pytest.raises(NonFiniteError, match=f"first appear in layer {layer}$"):
        if "prefill" in phases:
            model.prefill([3, 5, 7])
        else:
            model.decode(3)
    clean = MeshModel.from_weights(
        config, weights, control_plane(), decode_mesh=(ry, 2 * rx), phases=["decode"]
    )
    clean.start(8)
    assert np.isfinite(clean.logits_to_host(clean.decode(3))).all()
