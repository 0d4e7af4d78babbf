"""Inputs that each rank could read for itself are the same on every rank: whole ``mpiexec``
jobs whose ranks each run in their own directory, as on hosts without a shared filesystem.

The prompt file is read on rank 0 alone and its text broadcast; the tensors of an HF model
directory and a chat template are compared with rank 0's before anything is loaded, and a
difference ends the job with one ``error: on rank R:`` line.
"""

import json
import shutil

import numpy as np
import pytest
from faultcase import PER_RANK_CWD, assert_one_error, needs_mpiexec, run
from goldens import FIXTURES

pytestmark = needs_mpiexec
MODEL = FIXTURES / "tiny-llama-gqa"
TEMPLATE = "{% for m in messages %}<|{{ m.role }}|> {{ m.content }}\n{% endfor %}<|assistant|>"


def nodes(tmp_path, n=2):
    """One directory per rank (its "node"), and the script that runs rank r in directory r."""
    script = tmp_path / "per_rank_cwd.py"
    script.write_text(PER_RANK_CWD)
    dirs = [tmp_path / f"node{r}" for r in range(n)]
    for d in dirs:
        d.mkdir()
    return script, dirs


def generate_json(args, n=None, prefix=()):
    args = [*prefix, "generate", *args, "--max-new-tokens", "5", "--json"]
    p, _ = run(args, n=n, timeout=120, module=None if prefix else "llm")
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)["new_ids"]


@pytest.mark.parametrize("other", ["the wafer holds every weight of the model", None])
def test_prompt_file_is_read_on_rank_0_and_broadcast(other, tmp_path):
    """Rank 1 has another prompt (of another length), or none: rank 0's text is the prompt."""
    script, (n0, n1) = nodes(tmp_path)
    text = "the mesh passes the cache"
    (n0 / "prompt.txt").write_text(text)
    if other is not None:
        (n1 / "prompt.txt").write_text(other)
        shutil.copytree(MODEL, n1 / "model")
    shutil.copytree(MODEL, n0 / "model")
    if other is None:
        shutil.copytree(MODEL, n1 / "model")
    want = generate_json(["--model", MODEL, "--prompt", text])
    got = generate_json(
        ["--model", "model", "--prompt-file", "prompt.txt", "--decode-mesh", "2x2"],
        n=2,
        prefix=(script, n0, n1),
    )
    assert got == want


def _changed_weights(src, dst):
    """A copy of the HF model ``src`` at ``dst`` with one tensor scaled: valid, other weights."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    name = sorted(n for n in tensors if n.endswith("mlp.down_proj.weight"))[0]
    tensors[name] = (tensors[name] * np.float32(1.5)).astype(tensors[name].dtype)
    save_file(tensors, str(dst / "model.safetensors"))


@pytest.mark.parametrize("verify", [True, False], ids=["sha256", "no-verify"])
def test_hf_model_with_other_weights_on_rank_1_is_refused(verify, tmp_path):
    script, (n0, n1) = nodes(tmp_path)
    shutil.copytree(MODEL, n0 / "model")
    _changed_weights(MODEL, n1 / "model")
    args = ["generate", "--model", "model", "--prompt-ids", "1,5,9", "--max-new-tokens", "2"]
    if not verify:  # sizes only: the same size passes, a truncated file does not
        with open(n1 / "model" / "model.safetensors", "ab") as f:
            f.write(b"\0" * 8)
        args.append("--no-verify")
    p, dt = run([script, n0, n1, *args], n=2, module=None, timeout=120)
    assert_one_error(p, dt, "on rank 1:", "model.safetensors differs from rank 0's")


def test_chat_template_differing_on_rank_1_is_refused(tmp_path):
    script, (n0, n1) = nodes(tmp_path)
    for d, template in ((n0, TEMPLATE), (n1, TEMPLATE.replace("<|assistant|>", "<|bot|>"))):
        shutil.copytree(MODEL, d / "model")
        (d / "model" / "tokenizer_config.json").write_text(
            json.dumps({"chat_template": template, "bos_token": "<s>"})
        )
    args = ["generate", "--model", "model", "--chat", "hello", "--max-new-tokens", "2"]
    p, dt = run([script, n0, n1, *args], n=2, module=None, timeout=120)
    assert_one_error(p, dt, "on rank 1:", "chat template differs from rank 0's")
