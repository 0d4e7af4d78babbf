"""``llm chat``: a scripted multi-turn session under mpiexec; the KV cache is reused across turns.

The model is the tiny GGUF of :mod:`gguf_fixture` (byte-level BPE, ChatML template), converted
for a 1x2 rank grid. Each turn must feed only its new tokens, and its reply must equal a fresh
run over the whole token history (the reference model on the same weights).
"""
import json
import subprocess
import sys

import pytest

from gguf_fixture import write_tiny_gguf, tiny_config
from llm.convert import convert
from llm.reference import ReferenceModel
from test_cli import ENV, MPIEXEC, ROOT, needs_mpiexec

pytest.importorskip("gguf")
pytest.importorskip("jinja2")


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("chat")
    stored = write_tiny_gguf(d / "tiny.gguf", seed=5)
    convert(d / "shards", str(d / "tiny.gguf"), ranks=(1, 2),
            meshes={"decode": (2, 2), "prefill": (2, 4)}, progress=False)
    return d / "shards", stored


def chat(shards, script, *extra, n=2, timeout=300):
    cmd = ([MPIEXEC, "-n", str(n)] if n else []) + [sys.executable, "-m", "mpi4py", "-m", "llm",
                                                     "chat", "--model", str(shards), *extra]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, input=script, capture_output=True, text=True,
                          timeout=timeout)


@needs_mpiexec
def test_scripted_session_reuses_the_cache(chat_model):
    shards, stored = chat_model
    p = chat(shards, "the cat\n\n12 the cat\nthe\n", "--max-new-tokens", "6", "--json",
             "--system", "be brief")
    assert p.returncode == 0, p.stderr
    turns = [json.loads(line) for line in p.stdout.splitlines()]
    assert [t["turn"] for t in turns] == [1, 2, 3]
    ref = ReferenceModel(tiny_config(), stored)
    history = []
    for t in turns:
        assert not t["reprefilled"]
        assert t["cached"] == len(history)
        if history:         # only the new turn: the last reply token, then the template text
            assert t["fed_ids"][0] == history_tail
            assert len(t["fed_ids"]) < len(history)
        history += t["fed_ids"]
        # the reply equals a fresh greedy run over the whole history, stopping at <|im_end|>
        assert t["new_ids"] == ref.generate(history, 6, stop_ids=(2,))
        history += t["new_ids"][:-1]
        history_tail = t["new_ids"][-1]
    assert turns[0]["fed_ids"][:4] == [1] + turns[0]["fed_ids"][1:4]   # <|im_start|> first


@needs_mpiexec
def test_reset_exit_and_context_full(chat_model):
    shards, _ = chat_model
    p = chat(shards, "the cat\n/reset\nthe cat\n/exit\nnever read\n", "--max-new-tokens", "4",
             "--json")
    assert p.returncode == 0, p.stderr
    a, b = [json.loads(line) for line in p.stdout.splitlines()]
    assert b["cached"] == 0 and a["fed_ids"] == b["fed_ids"] and a["new_ids"] == b["new_ids"]
    # a session context too small for two turns starts a new conversation for the second one
    p = chat(shards, "the cat\nthe cat\n", "--max-new-tokens", "4", "--json", "--context", "40")
    assert p.returncode == 0, p.stderr
    a, b = [json.loads(line) for line in p.stdout.splitlines()]
    assert b["reprefilled"] and b["cached"] == 0 and b["fed_ids"] == a["fed_ids"]


def test_chat_needs_a_template(tmp_path):
    p = chat(ROOT + "/tests/fixtures/tiny-llama-gqa", "hi\n", n=None)
    assert p.returncode == 2 and "no chat template" in p.stderr.splitlines()[-1]
