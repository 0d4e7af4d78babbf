"""``llm chat`` checks its model before loading it, like ``generate``: a bad shard set, mesh,
rank count or model directory ends every rank with the same one-line error (exit 2), on one
process and on two ranks, including when the ranks' directories differ (no shared filesystem)."""

import os
import shutil

import pytest
from faultcase import MPIEXEC, PER_RANK_CWD, assert_one_error, needs_mpiexec, run
from goldens import FIXTURES

from llm.storage.convert import convert

pytest.importorskip("gguf")
pytest.importorskip("jinja2")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """The tiny chat model (ChatML template) converted for one process and for 1x2 ranks."""
    from gguf_fixture import write_tiny_gguf

    d = tmp_path_factory.mktemp("chat-preflight")
    write_tiny_gguf(d / "tiny.gguf", seed=5)
    for name, ranks in (("r11", (1, 1)), ("r12", (1, 2))):
        convert(
            d / name, str(d / "tiny.gguf"), ranks=ranks, meshes={"decode": (2, 2)}, progress=False
        )
    return d


#: Each bad start: (arguments, phrases of the one error line). ``{one}`` is the shard set of the
#: running rank count, ``{other}`` the one of the other count, ``{dir}`` the fixture directory.
BAD_STARTS = {
    "no-directory": (["--model", "{dir}/nothing"], ["no such directory"]),
    "no-template": (["--model", str(FIXTURES / "tiny-llama-gqa")], ["no chat template"]),
    "rank-count": (["--model", "{other}"], ["converted for rank grid"]),
    "mesh": (["--model", "{one}", "--decode-mesh", "3x3"], ["3x3 was requested"]),
    "context": (["--model", "{one}", "--max-new-tokens", "128"], ["session context of 128"]),
    "sampling": (["--model", "{one}", "--top-p", "0"], ["argument --top-p", "(0, 1]"]),
    "seed": (["--model", "{one}", "--seed", "-1"], ["argument --seed", ">= 0"]),
}


@pytest.mark.parametrize("n", [None, 2], ids=["one-process", "2-ranks"])
@pytest.mark.parametrize("case", list(BAD_STARTS))
def test_bad_start_is_one_clear_error(case, n, shards):
    if n and not os.path.exists(MPIEXEC):
        pytest.skip("no mpiexec in the venv")
    one, other = ("r12", "r11") if n else ("r11", "r12")
    args, phrases = BAD_STARTS[case]
    args = [a.format(one=shards / one, other=shards / other, dir=shards) for a in args]
    p, dt = run(["chat", "--max-new-tokens", "8", *args], n=n, timeout=120)
    assert_one_error(p, dt, *phrases)


@needs_mpiexec
@pytest.mark.parametrize(
    "damage, phrases",
    [
        ("no-directory", ["on rank 1: --model model: no such directory"]),
        ("no-tokenizer", ["the ranks read different tokenizers", "byte-level fallback"]),
        ("other-template", ["the ranks read different chat templates"]),
    ],
)
def test_ranks_that_see_different_model_directories_stop_alike(damage, phrases, shards, tmp_path):
    """No shared filesystem: rank 1's copy of the model is missing or differs from rank 0's."""
    here, there = tmp_path / "node0", tmp_path / "node1"
    shutil.copytree(shards / "r12", here / "model")
    there.mkdir()
    if damage != "no-directory":
        shutil.copytree(shards / "r12", there / "model")
    if damage == "no-tokenizer":
        (there / "model" / "tokenizer.json").unlink()
    if damage == "other-template":
        cfg = there / "model" / "tokenizer_config.json"
        cfg.write_text(cfg.read_text().replace("<|im_start|>", "<|im_start|> "))
    script = tmp_path / "per_rank_cwd.py"
    script.write_text(PER_RANK_CWD)
    p, dt = run(
        [script, here, there, "chat", "--model", "model", "--max-new-tokens", "8"], n=2, module=None
    )
    assert_one_error(p, dt, *phrases)
