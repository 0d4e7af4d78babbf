"""The real model (SmolLM2-135M-Instruct GGUF) on the mesh against transformers loading the same
file. Part of ``make test-oracle`` (oracle venv: torch, transformers, gguf, accelerate).

Skipped unless ``WAFERLLM_GGUF`` names the fetched file (the Makefile sets it from
``python -m llm fetch smollm2``). The mesh runs in the project venv under mpiexec
(``tests/oracle/mesh_run.py``); this process holds transformers.

Compared, for several chat prompts rendered by the model's own template:

* prompt ids: ours (tokenizer rebuilt from the GGUF metadata, template rendered with jinja2)
  against ``AutoTokenizer(..., gguf_file=)`` and ``apply_chat_template``; also a varied text set;
* the last prompt token's logits and 32 greedy tokens (no early stop);
* shards in float32 on 1 rank (decode mesh 2x2, prefill 1x2) and on 4 ranks (rank grid 2x2,
  decode 2x4, prefill 4x2): equal to transformers in float32;
* shards in bfloat16 (same meshes): against transformers in bfloat16; where the greedy tokens
  part, the first divergence is reported (out/oracle-gguf.json) and what is asserted is
  that the first tokens and the logits' top candidates agree. (Measured: transformers in
  bfloat16 computes activations in bfloat16 too, and parts from our bfloat16-stored run at
  tokens 19 and 5 of two prompts; our run, which keeps float32 activations and accumulation,
  matches transformers in float32 on all 3x32 tokens.)
"""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from meshrt.runtime import LOCAL_MPI_ENV

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")
pytest.importorskip("jinja2")

GGUF = os.environ.get("WAFERLLM_GGUF")
pytestmark = pytest.mark.skipif(
    not GGUF or not Path(GGUF).is_file(),
    reason="set WAFERLLM_GGUF to the fetched model (make test-oracle)",
)

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("WAFERLLM_VENV", ROOT / ".venv"))
NEW = 32
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Name three primary colors."},
    ],
    [{"role": "user", "content": "Write a Python function that adds two numbers."}],
]
TEXTS = [
    "Hello world",
    "12345 67890 3.14159 and 2024-11-29",
    "  leading\t\ttabs\n\n\nnewlines  ",
    "héllo wörld ñ 日本語 テスト 🎉👍🏽",
    "def f(x):\n    return x**2  # square\n",
    "don't won't I'm",
    "a  b   c    d      e",
    "1+1=2, 100%, $5.99",
    "中文字符和emoji😀混合",
    "<|im_start|>user\nHi<|im_end|>\n",
]
RUNS = {  # name: (ranks, convert options)
    "f32-1rank": (1, ["--ranks", "1x1", "--decode-mesh", "2x2", "--prefill-mesh", "1x2"]),
    "f32-4ranks": (4, ["--ranks", "2x2", "--decode-mesh", "2x4", "--prefill-mesh", "4x2"]),
    "bf16-1rank": (
        1,
        ["--ranks", "1x1", "--decode-mesh", "2x2", "--prefill-mesh", "1x2", "--dtype", "bfloat16"],
    ),
    "bf16-4ranks": (
        4,
        ["--ranks", "2x2", "--decode-mesh", "2x4", "--prefill-mesh", "4x2", "--dtype", "bfloat16"],
    ),
}
ENV = dict(os.environ, **LOCAL_MPI_ENV, PYTHONUNBUFFERED="1")
REPORT = ROOT / "out" / "oracle-gguf.json"


def _venv(cmd, n=None, timeout=1800):
    launch = [str(VENV / "bin" / "mpiexec"), "-n", str(n)] if n and n > 1 else []
    p = subprocess.run(
        launch + [str(VENV / "bin" / "python")] + cmd,
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return p


@pytest.fixture(scope="module")
def hf():
    d, name = str(Path(GGUF).parent), Path(GGUF).name
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        d, gguf_file=name, dtype=torch.float32
    )
    return tok, model.eval()


@pytest.fixture(scope="module")
def ours():
    from tokenizers import Tokenizer

    from llm.storage.gguf_source import GGUFFile
    from llm.storage.gguf_tokenizer import build_tokenizer, tokenizer_config, tokenizer_metadata
    from llm.text.chat_template import ChatTemplate

    meta = tokenizer_metadata(GGUFFile(GGUF))
    tok = Tokenizer.from_str(build_tokenizer(meta).to_str())
    cfg = tokenizer_config(meta)
    return tok, ChatTemplate(
        cfg["chat_template"], {k: cfg.get(k) for k in ("bos_token", "eos_token")}
    )


@pytest.fixture(scope="module")
def prompts(hf, ours):
    tok, template = ours
    return [tok.encode(template.render(c), add_special_tokens=False).ids for c in CHATS]


@pytest.fixture(scope="module")
def report():
    data = {}
    yield data
    REPORT.parent.mkdir(exist_ok=True)
    REPORT.write_text(json.dumps(data, indent=1) + "\n")
    print(f"\noracle-gguf report ({REPORT}):")
    for name, r in data.items():
        print(f"  {name}: {json.dumps(r)}")


def test_prompt_ids_equal_transformers(hf, ours, prompts):
    hf_tok, _ = hf
    tok, template = ours
    for text in TEXTS:
        assert tok.encode(text).ids == hf_tok(text)["input_ids"], text
        assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text
    for chat, ids in zip(CHATS, prompts):
        text = hf_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert template.render(chat) == text
        assert ids == hf_tok(text, add_special_tokens=False)["input_ids"]


def _hf_run(model, ids):
    """Last logits (float32) and NEW greedy tokens, no early stop."""
    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=True)
        last = out.logits[0, -1].float().numpy()
        past, tokens = out.past_key_values, [int(out.logits[0, -1].argmax())]
        while len(tokens) < NEW:
            out = model(torch.tensor([[tokens[-1]]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            tokens.append(int(out.logits[0, -1].argmax()))
    return last, tokens


@pytest.fixture(scope="module")
def hf_results(hf, prompts):
    _, model = hf
    f32 = [_hf_run(model, ids) for ids in prompts]
    bf16 = [_hf_run(model.to(torch.bfloat16), ids) for ids in prompts]
    model.to(torch.float32)
    return {"float32": f32, "bfloat16": bf16}


def _mesh(tmp_path_factory, name, prompts):
    ranks, opts = RUNS[name]
    d = tmp_path_factory.mktemp(name)
    _venv(
        [
            "-m",
            "mpi4py",
            "-m",
            "llm",
            "convert",
            GGUF,
            "--out",
            str(d / "shards"),
            "--progress",
            "off",
            "-q",
        ]
        + opts,
        n=ranks,
    )
    (d / "prompts.json").write_text(json.dumps(prompts))
    _venv(
        [
            "-m",
            "mpi4py",
            str(ROOT / "tests" / "oracle" / "mesh_run.py"),
            str(d / "shards"),
            str(d / "prompts.json"),
            str(d / "out.npz"),
            str(NEW),
        ],
        n=ranks,
    )
    res = np.load(d / "out.npz")
    return res["logits"], res["tokens"]


def _first_divergence(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


@pytest.mark.parametrize("name", ["f32-1rank", "f32-4ranks"])
def test_float32_shards_equal_transformers(name, tmp_path_factory, prompts, hf_results, report):
    logits, tokens = _mesh(tmp_path_factory, name, prompts)
    worst = 0.0
    for i, (ref_logits, ref_tokens) in enumerate(hf_results["float32"]):
        diff = float(np.abs(logits[i] - ref_logits).max())
        worst = max(worst, diff)
        assert diff < 1e-3, (i, diff)  # measured: 3.8e-5 (logits up to ~30)
        assert tokens[i].tolist() == ref_tokens, (i, _first_divergence(tokens[i], ref_tokens))
    report[name] = {"max_abs_logit_diff": worst, "greedy_tokens_equal": f"{len(prompts)}x{NEW}"}


@pytest.mark.parametrize("name", ["bf16-1rank", "bf16-4ranks"])
def test_bfloat16_shards_against_transformers_bf16(
    name, tmp_path_factory, prompts, hf_results, report
):
    logits, tokens = _mesh(tmp_path_factory, name, prompts)
    rows = []
    for i, (ref_logits, ref_tokens) in enumerate(hf_results["bfloat16"]):
        top_ours = set(np.argsort(-logits[i])[:5].tolist())
        top_ref = set(np.argsort(-ref_logits)[:5].tolist())
        corr = float(np.corrcoef(logits[i], ref_logits)[0, 1])
        rows.append(
            {
                "prompt": i,
                "first_divergence": _first_divergence(tokens[i], ref_tokens),
                "top5_overlap": len(top_ours & top_ref),
                "logit_corr": round(corr, 5),
                "max_abs_logit_diff": float(np.abs(logits[i] - ref_logits).max()),
            }
        )
        assert tokens[i][0] == ref_tokens[0], rows[-1]
        assert corr > 0.99 and len(top_ours & top_ref) >= 3, rows[-1]
    f32 = hf_results["float32"]
    report[name] = {
        "against": "transformers bfloat16",
        "prompts": rows,
        "vs_transformers_float32_first_divergence": [
            _first_divergence(tokens[i], f32[i][1]) for i in range(len(prompts))
        ],
    }
