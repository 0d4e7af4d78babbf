"""Streamed placement: a rank's block straight from the source equals its slice of the global
tiles; 16-bit weights stay 16-bit in memory and kernels widen them exactly; embedding tables
read only the rows looked up."""

import numpy as np
import pytest
from goldens import FIXTURES
from meshtest import as_params, fabric, layouts, world

from llm.engine.model import MeshModel
from llm.modeling.config import preset
from llm.placement.layout import PhaseLayout
from llm.placement.phase_tiles import PHASE_SPECS
from llm.placement.streamed import LazyBlock, RowTable, place, tile_shape
from llm.storage.checkpoint import (
    Checkpoint,
    RandomWeights,
    load_checkpoint,
    random_weights,
    save_model_dir,
)
from meshrt import hostio
from meshrt.mesh import lcm
from meshrt.ops import gemv as V
from meshrt.ops.gemm import meshgemm, prepare_a, prepare_b, prepare_b_region
from meshrt.precision import round_to_bf16, to_words, widen
from meshrt.runtime import ControlPlane

RECTS = [(0, 0, None), (1, 1, None)]  # whole mesh; the cores off the first row and column


def _rect(mesh, y0, x0, block):
    return (y0, x0), block or (mesh[0] - y0, mesh[1] - x0)


@pytest.mark.parametrize("mesh", [(4, 6), (6, 4), (3, 3)])
@pytest.mark.parametrize("axis", ["y", "x"])
@pytest.mark.parametrize("reader_rows", ["out", "in"])
def test_weight_region_is_a_slice_of_weight_tiles(mesh, axis, reader_rows, monkeypatch):
    monkeypatch.setattr(V, "CHUNK_ELEMENTS", 64)  # many pieces
    w = np.random.default_rng(0).standard_normal((12 * 5, 12 * 7)).astype(np.float32)
    full = V.weight_tiles(w, mesh, axis)
    for y0, x0, block in RECTS:
        origin, block = _rect(mesh, y0, x0, block)
        got = V.weight_region(
            lambda r, c: w[r][:, c], w.shape, mesh, axis, origin, block, reader_rows=reader_rows
        )
        assert np.array_equal(got, full[y0 : y0 + block[0], x0 : x0 + block[1]])


@pytest.mark.parametrize("mesh", [(4, 6), (6, 4), (2, 2)])
@pytest.mark.parametrize("algo", ["meshgemm", "cannon"])
def test_prepare_b_region_is_a_slice_of_prepare_b(mesh, algo):
    nl = lcm(*mesh)
    w = np.random.default_rng(1).standard_normal((3 * nl, 2 * nl)).astype(np.float32)
    full = prepare_b(w, mesh, algo)
    for y0, x0, block in RECTS:
        origin, block = _rect(mesh, y0, x0, block)
        got = prepare_b_region(
            lambda r, c: w[r][:, c], w.shape, mesh, origin, block, algo, storage="bfloat16"
        )
        assert got.dtype == np.uint16
        assert np.array_equal(
            widen(got), round_to_bf16(full[y0 : y0 + block[0], x0 : x0 + block[1]])
        )


@pytest.mark.parametrize("phase", ["decode", "prefill"])
def test_row_table_reads_what_the_placed_table_holds(phase):
    config = preset("tiny-llama")
    w = RandomWeights(config, 4)
    for mesh in [(2, 3), (4, 4)]:
        spec = PHASE_SPECS[phase](PhaseLayout(config, *mesh))["embed"]
        full = place(spec, w, mesh)
        for y0, x0, block in RECTS:
            origin, block = _rect(mesh, y0, x0, block)
            table = RowTable(
                w,
                spec.parts[0],
                block + tile_shape(spec, mesh),
                origin,
                "x" if phase == "decode" else "y",
            )
            want = full[y0 : y0 + block[0], x0 : x0 + block[1]]
            assert table.shape == want.shape and table.size == want.size
            for key in [
                (slice(None), slice(None), 3),
                (slice(None), 0, 5, slice(None)),
                (np.array([0, block[0] - 1]), slice(None), np.array([1, 7])),
            ]:
                assert np.array_equal(table[key], want[key]), key


def test_sources_read_row_ranges(tmp_path):
    config = preset("tiny-llama")
    w = random_weights(config, 1)
    assert np.array_equal(
        RandomWeights(config, 1).rows("model.embed_tokens.weight", 70, 140),
        w["model.embed_tokens.weight"][70:140],
    )
    for dtype in ("float32", "float16", "bfloat16"):
        ck = Checkpoint(save_model_dir(tmp_path / dtype, config, w, dtype))
        for name in ("model.layers.1.mlp.down_proj.weight", "model.norm.weight"):
            assert np.array_equal(ck.rows(name, 5, 17), ck[name][5:17])


@pytest.mark.mpi
def test_local_gemv_widens_16_bit_words_exactly():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 4, 24)).astype(np.float32)
    w = rng.standard_normal((3, 4, 24, 40)).astype(np.float32)
    for storage, rounded in (
        ("bfloat16", round_to_bf16(w)),
        ("float16", w.astype(np.float16).astype(np.float32)),
    ):
        words = to_words(w, storage)
        assert words.itemsize == 2
        np.testing.assert_allclose(
            V.local_gemv(x, words), V.local_gemv(x, rounded), rtol=1e-6, atol=1e-6
        )


@pytest.mark.mpi
@pytest.mark.parametrize("lay", as_params(layouts(world().Get_size())[:2]))
def test_meshgemm_on_bfloat16_words(lay):
    rng = np.random.default_rng(3)
    a = rng.standard_normal((21, 19)).astype(np.float32)
    b = rng.standard_normal((19, 23)).astype(np.float32)
    fab = fabric(lay)
    mesh = (lay.py, lay.px)
    bw = hostio.local_block(fab, to_words(prepare_b(b, mesh, "meshgemm"), "bfloat16"))
    c = hostio.gather_matrix(
        fab, meshgemm(fab, hostio.local_block(fab, prepare_a(a, mesh)), bw), (21, 23), to_all=True
    )
    np.testing.assert_allclose(c, a.astype(np.float64) @ round_to_bf16(b), rtol=1e-5, atol=1e-4)


@pytest.mark.mpi
def test_bfloat16_model_holds_words_and_matches_bfloat16_shards(tmp_path_factory):
    """Weights placed in bfloat16 from an HF checkpoint give the same tokens and logits as the
    float32 placement of the same bfloat16-rounded values; embeddings are never placed."""
    comm = world()
    config, weights = load_checkpoint(FIXTURES / "tiny-llama-gqa", lazy=True)
    rounded = {k: round_to_bf16(v) for k, v in weights.items()}
    n = comm.Get_size()
    kw = dict(
        control=ControlPlane(comm if n > 1 else None),
        decode_mesh=(2, 2 * n),
        prefill_mesh=(3, 3 * n),
        ranks=(1, n),
    )
    words = MeshModel.from_weights(config, weights, storage="bfloat16", **kw)
    plain = MeshModel.from_weights(config, rounded, **kw)
    assert words.blocks["decode"]["layer0/qkv"].dtype == np.uint16
    assert isinstance(words.blocks["decode"]["embed"], RowTable)
    assert isinstance(words.blocks["prefill"]["lm_head"], LazyBlock)
    ids = [5, 9, 14, 3, 77]
    outs = []
    for model in (words, plain):
        model.start(model.capacity_for(len(ids) + 4))
        logits, every = model.prefill(ids, all_logits=True)
        seq = [model.pick(logits)]
        for _ in range(3):
            seq.append(model.pick(model.decode(seq[-1])))
        outs.append((every, seq))
    np.testing.assert_allclose(outs[0][0], outs[1][0], atol=1e-5, rtol=0)
    assert outs[0][1] == outs[1][1]
