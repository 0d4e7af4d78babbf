"""Batched decode: B sequences in one step give each sequence the tokens it gets alone.

Each sequence keeps its own KV cache; every vector op carries B vectors and every reduction B
words. Prompts of different lengths share a batch; greedy and seeded sampling alike; on every
rank grid of the run (1, 2, 4 and 6 ranks).
"""

import numpy as np
import pytest
from goldens import FIXTURES
from meshtest import control_plane, rank_grids, world

from llm.engine.kvcache import ContextFullError
from llm.engine.model import MeshModel
from llm.storage.checkpoint import load_checkpoint
from llm.text.sampling import Sampler

pytestmark = pytest.mark.mpi

PROMPTS = [[3, 5, 7], [9, 11, 13, 4, 8, 2], [1], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30]]
NEW = 6


def _model(name, mesh, policy="shift", phases=None):
    config, weights = load_checkpoint(FIXTURES / name)
    return MeshModel.from_weights(
        config,
        weights,
        control_plane(),
        decode_mesh=mesh,
        phases=phases,
        kv_policy=policy,
        progress=False,
    )


def _alone(model, prompt, sampler):
    """Tokens and per-step logits of one request run by itself (the generate loop)."""
    model.start(model.capacity_for(len(prompt) + NEW))
    logits = model.prefill(prompt)
    tokens, seen = [], [model.logits_to_host(logits)]
    tokens.append(model.pick(logits, sampler))
    for _ in range(NEW - 1):
        logits = model.decode(tokens[-1])
        seen.append(model.logits_to_host(logits))
        tokens.append(model.pick(logits, sampler))
    return tokens, np.array(seen)


def _together(model, prompts, samplers):
    cap = model.capacity_for(max(len(p) for p in prompts) + NEW)
    seqs = [model.open_sequence(cap) for _ in prompts]
    tokens = []
    for seq, prompt, sampler in zip(seqs, prompts, samplers):
        tokens.append([model.pick(model.prefill_sequence(seq, prompt), sampler)])
    seen = [[] for _ in prompts]
    for _ in range(NEW - 1):
        logits = model.decode_sequences(seqs, [t[-1] for t in tokens])
        full = model.running.gather_logits(logits)  # f32[B, vocab]
        for i, row in enumerate(full):
            seen[i].append(row)
        for t, new in zip(tokens, model.pick_sequences(logits, samplers)):
            t.append(new)
    return tokens, [np.array(s) for s in seen]


def _prefilled_together(model, prompts, samplers):
    """:func:`_together` with the prompts prefilled in one prefill."""
    cap = model.capacity_for(max(len(p) for p in prompts) + NEW)
    seqs = [model.open_sequence(cap) for _ in prompts]
    logits = model.prefill_sequences(seqs, prompts)
    seen = [[row] for row in model.running.gather_logits(logits)]
    tokens = [[t] for t in model.pick_sequences(logits, samplers)]
    for _ in range(NEW - 1):
        logits = model.decode_sequences(seqs, [t[-1] for t in tokens])
        for i, row in enumerate(model.running.gather_logits(logits)):
            seen[i].append(row)
        for t, new in zip(tokens, model.pick_sequences(logits, samplers)):
            t.append(new)
    return tokens, [np.array(s) for s in seen]


def _meshes():
    """One core per rank on one rank grid, uneven blocks on another."""
    grids = rank_grids(world().Get_size())
    (ry, rx), (gy, gx) = grids[-1], grids[len(grids) // 2]
    return [(ry, rx), (3 * gy, 2 * gx)]


@pytest.mark.parametrize(
    "name,policy",
    [("tiny-llama-gqa", "shift"), ("tiny-llama-gqa", "concat"), ("tiny-qwen2", "shift")],
)
def test_batch_tokens_equal_each_request_alone_greedy(name, policy):
    for mesh in _meshes() if policy == "shift" and "llama" in name else _meshes()[1:]:
        model = _model(name, mesh, policy)
        alone = [_alone(model, p, None) for p in PROMPTS]
        tokens, seen = _together(model, PROMPTS, [None] * len(PROMPTS))
        assert tokens == [a[0] for a in alone], f"mesh {mesh}"
        for (_, logits), got in zip(alone, seen):  # float32 sums in another order
            np.testing.assert_allclose(got, logits[1:], atol=1e-4, rtol=0)


def test_batch_tokens_equal_each_request_alone_seeded_sampling():
    mesh = _meshes()[0]
    model = _model("tiny-llama-gqa", mesh)

    def samplers():  # greedy and sampled requests mixed in one batch
        return [
            Sampler(0.9, seed=11),
            None,
            Sampler(1.3, top_k=20, seed=5),
            Sampler(0.7, top_p=0.9, seed=2),
        ]

    alone = [_alone(model, p, s)[0] for p, s in zip(PROMPTS, samplers())]
    tokens, _ = _together(model, PROMPTS, samplers())
    assert tokens == alone
    assert len({tuple(t) for t in tokens}) == len(tokens)


def test_one_sequence_is_the_single_step_exactly():
    """B = 1 through the batch entry points is today's step: same logits, same ledger."""
    mesh = _meshes()[0]
    model = _model("tiny-llama-gqa", mesh, phases=["decode"])
    led = model.decode_fabric.ledger
    model.start(8)
    ref = []
    for t in (3, 5, 7, 9):
        ref.append(model.logits_to_host(model.decode(t)))
    ref_ops = dict(led.ops)
    led.reset()
    seq = model.open_sequence(8)
    got = []
    for t in (3, 5, 7, 9):
        got.append(model.logits_to_host(model.decode_sequences([seq], [t])))
    np.testing.assert_array_equal(np.array(got), np.array(ref))
    assert dict(led.ops) == ref_ops


def test_caches_stay_apart_and_a_full_cache_is_refused():
    mesh = _meshes()[0]
    model = _model("tiny-llama-gqa", mesh, phases=["decode"])
    rows = mesh[0]
    a, b = model.open_sequence(1), model.open_sequence(1)
    for t in range(rows):  # fills a's cache (one slot per row)
        model.decode_sequences([a], [t + 3])
    assert a.cache.full and not b.cache.full and b.cache.length == 0
    model.decode_sequences([b], [4])
    assert a.cache.length == rows and b.cache.length == 1
    with pytest.raises(ContextFullError):
        model.decode_sequences([b, a], [5, 6])
    assert b.cache.length == 1  # nothing moved
    with pytest.raises(ValueError, match="one capacity"):
        model.decode_sequences([b, model.open_sequence(2)], [5, 6])


@pytest.mark.parametrize("name", ["tiny-llama-gqa", "tiny-qwen2"])
def test_prompts_prefilled_together_give_each_request_its_tokens_alone(name):
    """One prefill of several prompts (each at its own positions, attending to itself only),
    one hand-off each: every sequence's first logits and tokens are those it gets alone."""
    for mesh in _meshes():
        model = _model(name, mesh)

        def samplers():
            return [None, Sampler(0.9, seed=11), None, Sampler(0.7, top_p=0.9, seed=2)]

        alone = [_alone(model, p, s) for p, s in zip(PROMPTS, samplers())]
        tokens, seen = _prefilled_together(model, PROMPTS, samplers())
        assert tokens == [a[0] for a in alone], f"mesh {mesh}"
        for (_, logits), got in zip(alone, seen):  # float32 sums in another order
            np.testing.assert_allclose(got, logits, atol=1e-4, rtol=0)
        # in any order of the prompts, and a prompt after a long one
        order = [3, 0, 2, 1]
        again, _ = _prefilled_together(model, [PROMPTS[i] for i in order], [None] * 4)
        greedy = [_alone(model, PROMPTS[i], None)[0] for i in order]
        assert again == greedy, f"mesh {mesh}"
