"""``llm chat``: a scripted multi-turn session under mpiexec; the KV cache is reused across turns.

The model is the tiny GGUF of :mod:`gguf_fixture` (byte-level BPE, ChatML template), converted
for a 1x2 rank grid. Each turn must feed only its new tokens, and its reply must equal a fresh
run over the whole token history (the reference model on the same weights).
"""

import json
import subprocess
import sys

import pytest
from cliproc import ENV, MPIEXEC, ROOT, needs_mpiexec
from gguf_fixture import tiny_config, write_tiny_gguf

from llm.modeling.reference import ReferenceModel
from llm.storage.convert import convert

pytest.importorskip("gguf")
pytest.importorskip("jinja2")


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """Shard sets for 2 ranks (1x2) and for one process, and the weights as stored."""
    d = tmp_path_factory.mktemp("chat")
    stored = write_tiny_gguf(d / "tiny.gguf", seed=5)
    convert(
        d / "shards",
        str(d / "tiny.gguf"),
        ranks=(1, 2),
        meshes={"decode": (2, 2), "prefill": (2, 4)},
        progress=False,
    )
    convert(
        d / "one",
        str(d / "tiny.gguf"),
        ranks=(1, 1),
        meshes={"decode": (2, 2), "prefill": (1, 2)},
        progress=False,
    )
    return d, stored


def chat(shards, script, *extra, n=2, timeout=300):
    cmd = ([MPIEXEC, "-n", str(n)] if n else []) + [
        sys.executable,
        "-m",
        "mpi4py",
        "-m",
        "llm",
        "chat",
        "--model",
        str(shards),
        *extra,
    ]
    return subprocess.run(
        cmd, cwd=ROOT, env=ENV, input=script, capture_output=True, text=True, timeout=timeout
    )


@needs_mpiexec
def test_scripted_session_reuses_the_cache(chat_model):
    d, stored = chat_model
    # Open MPI does not pass the end of piped input on to rank 0: the script says /exit
    p = chat(d / "shards", "the cat\n\n12 the\n/exit\n", "--max-new-tokens", "4", "--json")
    assert p.returncode == 0, p.stderr
    turns = [json.loads(line) for line in p.stdout.splitlines()]
    assert [t["turn"] for t in turns] == [1, 2]
    ref = ReferenceModel(tiny_config(), stored)
    history, history_tail = [], None
    for t in turns:
        assert not t["reprefilled"]
        assert t["cached"] == len(history)
        if history:  # only the new turn: the last reply token, then the template text
            assert t["fed_ids"][0] == history_tail
        assert t["prompt_tokens"] == len(t["fed_ids"])  # only these went through the model
        history += t["fed_ids"]
        # the reply equals a fresh greedy run over the whole history, stopping at <|im_end|>
        assert t["new_ids"] == ref.generate(history, 4, stop_ids=(2,))
        history += t["new_ids"][:-1]
        history_tail = t["new_ids"][-1]
    assert turns[0]["fed_ids"][0] == 1  # <|im_start|> opens the template


def test_reset_exit_and_context_full(chat_model):
    d, _ = chat_model
    p = chat(
        d / "one",
        "the cat\n/reset\nthe cat\n/exit\nnever read\n",
        "--max-new-tokens",
        "4",
        "--json",
        n=None,
    )
    assert p.returncode == 0, p.stderr
    a, b = [json.loads(line) for line in p.stdout.splitlines()]
    assert b["cached"] == 0 and a["fed_ids"] == b["fed_ids"] and a["new_ids"] == b["new_ids"]
    # a session context too small for two turns starts a new conversation for the second one
    p = chat(
        d / "one",
        "the cat\nthe cat\n",
        "--max-new-tokens",
        "4",
        "--json",
        "--context",
        "40",
        n=None,
    )
    assert p.returncode == 0, p.stderr
    a, b = [json.loads(line) for line in p.stdout.splitlines()]
    assert b["reprefilled"] and b["cached"] == 0 and b["fed_ids"] == a["fed_ids"]


def test_chat_needs_a_template(tmp_path):
    p = chat(ROOT + "/tests/fixtures/tiny-llama-gqa", "hi\n", n=None)
    last = p.stderr.splitlines()[-1]
    assert p.returncode == 2 and "no chat template" in last
    assert "llm generate --prompt" in last  # what to do with a base model


def test_generate_chat_on_a_base_model_points_to_prompt():
    from llm.serve.chat import chat_prompt_ids
    from meshrt.runtime import UsageError

    with pytest.raises(UsageError, match=r"no chat template .*; give a plain prompt with --prompt"):
        chat_prompt_ids(ROOT + "/tests/fixtures/tiny-llama-gqa", None, "hi")


def test_default_reply_length_fits_a_small_context(chat_model):
    d, _ = chat_model
    context = tiny_config().max_position_embeddings
    assert context < 2 * 256  # the default of 256 would not fit: half the context is used
    p = chat(d / "one", "the cat\n/exit\n", "--json", n=None)
    assert p.returncode == 0, p.stderr
    (turn,) = [json.loads(line) for line in p.stdout.splitlines()]
    assert 0 < len(turn["new_ids"]) <= context // 2
