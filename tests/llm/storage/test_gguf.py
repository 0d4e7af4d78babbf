"""GGUF files: config, de-quantized weights, q/k row order, tokenizer, convert + generate.

The files are written by the tests (``gguf.GGUFWriter``, quantized with ``gguf.quants``): no
download. The real model is compared against transformers in ``make test-oracle``.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
from cliproc import ENV, ROOT
from gguf_fixture import CHAT_TEMPLATE, byte_alphabet, tiny_config, vocabulary, write_tiny_gguf

from llm.engine.model import MeshModel
from llm.modeling.reference import ReferenceModel
from llm.serve.generate import generate
from llm.storage.convert import convert
from llm.storage.gguf_source import GGUFError, load_gguf, permute_rows, unpermute_rows
from llm.storage.gguf_tokenizer import tokenizer_files
from meshrt.runtime import ControlPlane

pytest.importorskip("gguf")


def byte_id(ch: str) -> int:
    return 3 + ord(ch)  # ids 0-2 are the control tokens; bytes follow in byte order


MERGED = {tok: i for i, tok in enumerate(vocabulary())}


@pytest.fixture()
def tiny(tmp_path):
    path = tmp_path / "tiny.gguf"
    return path, write_tiny_gguf(path)


def test_config_from_metadata_and_tied_embeddings(tmp_path, tiny):
    path, _ = tiny
    config, weights, _ = load_gguf(path)
    assert config == tiny_config()
    assert "lm_head.weight" not in weights
    untied = tmp_path / "untied.gguf"
    write_tiny_gguf(untied, tiny_config(tied=False))
    config, weights, _ = load_gguf(untied)
    assert not config.tie_word_embeddings and weights.types()["lm_head.weight"] == "F16"


def test_every_type_dequantized_and_qk_rows_restored(tiny):
    path, stored = tiny
    config, weights, _ = load_gguf(path)
    kinds = set(weights.types().values())
    assert kinds == {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"}
    assert set(weights) == set(stored)
    for name in weights:
        np.testing.assert_array_equal(weights[name], stored[name], err_msg=name)
    # an F32 k_proj goes through the row order untouched by quantization: exact round trip
    assert weights.types()["model.layers.1.self_attn.k_proj.weight"] == "F32"


def test_row_order_inverse():
    w = np.arange(4 * 8 * 3, dtype=np.float32).reshape(32, 3)
    assert np.array_equal(unpermute_rows(permute_rows(w, 4), 4), w)
    # llama.cpp interleaves the two halves of each head: row 2j <- j, row 2j+1 <- d/2 + j
    p = permute_rows(np.arange(8.0), 1)
    assert p.tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


def test_unsupported_type_and_architecture_are_one_clear_error(tmp_path):
    from gguf import GGMLQuantizationType  # noqa: F401  (Q5_0 exists in the writer)

    bad = tmp_path / "q5.gguf"
    write_tiny_gguf(bad, override_type={"model.layers.0.mlp.up_proj.weight": "Q5_0"})
    with pytest.raises(GGUFError, match=r"Q5_0 \(e.g. blk.0.ffn_up.weight\) is not supported"):
        load_gguf(bad)
    arch = tmp_path / "gpt2.gguf"
    write_tiny_gguf(arch, arch="gpt2")
    with pytest.raises(GGUFError, match="architecture 'gpt2' is not supported"):
        load_gguf(arch)
    p = subprocess.run(
        [sys.executable, "-m", "llm", "convert", str(bad), "--out", str(tmp_path / "out")],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert p.returncode == 2 and p.stderr.startswith("error: q5.gguf: tensor type Q5_0")
    assert "Traceback" not in p.stderr and not (tmp_path / "out").exists()


def _tokenizer(tmp_path, pre="smollm"):
    from tokenizers import Tokenizer

    path = tmp_path / f"{pre}.gguf"
    write_tiny_gguf(path, pre=pre)
    _, _, f = load_gguf(path)
    files = tokenizer_files(f)
    return Tokenizer.from_str(files["tokenizer.json"].decode()), json.loads(
        files["tokenizer_config.json"]
    )


def test_tokenizer_from_metadata(tmp_path):
    tok, cfg = _tokenizer(tmp_path)
    assert len(byte_alphabet()) == 256 and byte_alphabet()[ord(" ")] == "Ġ"
    # merges in priority order: "Ġ c" before "a t" before "Ġc at"; smollm splits digits apart
    assert tok.encode("the cat 12").tokens == ["t", "he", "Ġcat", "Ġ", "1", "2"]
    assert tok.encode("the cat 12").ids == [
        byte_id("t"),
        MERGED["he"],
        MERGED["Ġcat"],
        byte_id(" "),
        byte_id("1"),
        byte_id("2"),
    ]
    assert tok.encode(" the").tokens == ["Ġthe"]
    # control tokens stay whole and vanish when decoding with skip_special_tokens
    enc = tok.encode("<|im_start|>the  cat<|im_end|>")
    assert enc.ids[0] == 1 and enc.ids[-1] == 2
    assert tok.decode(enc.ids) == "the  cat"
    text = "héllo wörld\n\tdef f(x):  return 12  # ünïcode 日本"
    assert tok.decode(tok.encode(text).ids) == text
    assert cfg["chat_template"] == CHAT_TEMPLATE and cfg["eos_token"] == "<|im_end|>"
    assert cfg["add_bos_token"] is False
    gpt2, _ = _tokenizer(tmp_path, pre="gpt2")  # GPT-2's split keeps "12" together
    assert gpt2.encode("the cat 12").tokens == ["t", "he", "Ġcat", "Ġ", "12"]
    with pytest.raises(GGUFError, match="pre-tokenizer 'nonesuch'"):
        _tokenizer(tmp_path, pre="nonesuch")


def test_convert_gguf_then_generate_equals_reference(tmp_path, tiny):
    path, stored = tiny
    out = tmp_path / "shards"
    manifest = convert(
        out, str(path), ranks=(1, 1), meshes={"decode": (2, 2), "prefill": (2, 2)}, progress=False
    )
    assert manifest["copied_files"] == ["tokenizer.json", "tokenizer_config.json"]
    assert "GGUF" in manifest["source"] and "Q4_1" in manifest["source"]
    config = tiny_config()
    model = MeshModel.from_shards(out)
    prompt = [1, 119, 260, 264, 35]
    gen = generate(model, prompt, 10, stop_ids=())
    ref = ReferenceModel(config, stored).generate(prompt, 10, stop_ids=())
    assert gen.new_ids == ref
    # generate --chat on the shard set: the GGUF's template and tokenizer came along
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "llm",
            "generate",
            "--model",
            str(out),
            "--chat",
            "the cat",
            "--max-new-tokens",
            "4",
            "--json",
            "--ignore-eos",
        ],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert p.returncode == 0, p.stderr
    rec = json.loads(p.stdout)
    system_free = "<|im_start|>user\nthe cat<|im_end|>\n<|im_start|>assistant\n"
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert rec["prompt_ids"] == tok.encode(system_free).ids
    assert rec["new_ids"] == ReferenceModel(config, stored).generate(
        rec["prompt_ids"], 4, stop_ids=()
    )


def _world():
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    return comm if comm.Get_size() > 1 else None


@pytest.mark.mpi
def test_convert_gguf_on_every_rank_count(shared_tmp_path):
    from meshrt.mesh import default_rank_grid

    comm = _world()
    control = ControlPlane.of(comm)
    size = 1 if comm is None else comm.Get_size()
    path = shared_tmp_path / "tiny.gguf"
    rank = 0 if comm is None else comm.Get_rank()
    stored = write_tiny_gguf(path) if rank == 0 else None
    stored = stored if comm is None else comm.bcast(stored, root=0)
    ry, rx = default_rank_grid(size)
    out = shared_tmp_path / "shards"
    convert(
        out,
        str(path),
        ranks=(ry, rx),
        meshes={"decode": (2 * ry, 2 * rx), "prefill": (2 * ry, 4 * rx)},
        control=control,
        progress=False,
    )
    model = MeshModel.from_shards(out, control)
    prompt = [1, 119, 260, 264, 35, 52]
    gen = generate(model, prompt, 8, stop_ids=())
    assert gen.new_ids == ReferenceModel(tiny_config(), stored).generate(prompt, 8, stop_ids=())
