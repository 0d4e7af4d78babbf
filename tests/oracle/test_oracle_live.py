"""The reference model and the mesh model against HF transformers, live (skipped unless torch and
transformers import; ``make test-oracle``).

Run in the oracle venv (``requirements-oracle.txt``)::

    .venv-oracle/bin/python -m pytest -q tests/oracle/test_oracle_live.py

Each case builds a small random model with transformers, saves it with ``save_pretrained``, reads
it back with :mod:`llm.storage.checkpoint` and compares prefill logits, every decode step's logits
and the
greedy tokens with :class:`llm.modeling.reference.ReferenceModel`. It also checks that transformers
loads
the directories :func:`llm.storage.checkpoint.save_model_dir` writes, and that bfloat16 is read
exactly.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from llm.modeling.config import ModelConfig  # noqa: E402
from llm.modeling.reference import ReferenceModel  # noqa: E402
from llm.storage.checkpoint import Checkpoint, load_checkpoint, random_weights, save_model_dir  # noqa: E402

ATOL = 1e-4
NEW_TOKENS = 8
TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5


def hf_config(cls_name: str, rope: dict, **kwargs):
    """An HF config; ``rope`` holds rope_theta, rope_type and the scaling keys."""
    cls = getattr(transformers, cls_name)
    if TRANSFORMERS_5:
        kwargs["rope_parameters"] = dict(rope)
    else:
        rope = dict(rope)
        kwargs["rope_theta"] = rope.pop("rope_theta")
        kwargs["rope_scaling"] = rope if rope["rope_type"] != "default" else None
    return cls, cls.config_class(**kwargs)


CASES = {
    # GQA 6:2, llama3 scaling ramp inside a 40-token prompt (original context 16).
    "llama-gqa-llama3": (
        "LlamaForCausalLM",
        dict(
            rope_theta=10000.0,
            rope_type="llama3",
            factor=4.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=16,
        ),
        dict(
            vocab_size=131,
            hidden_size=36,
            intermediate_size=58,
            num_hidden_layers=2,
            num_attention_heads=6,
            num_key_value_heads=2,
            max_position_embeddings=128,
            rms_norm_eps=1e-5,
            eos_token_id=None,
            bos_token_id=None,
        ),
    ),
    # Every LLaMA bias, linear RoPE scaling, head_dim * heads != hidden, plain MHA.
    "llama-bias-linear": (
        "LlamaForCausalLM",
        dict(rope_theta=500000.0, rope_type="linear", factor=2.0),
        dict(
            vocab_size=97,
            hidden_size=30,
            intermediate_size=50,
            num_hidden_layers=2,
            num_attention_heads=3,
            num_key_value_heads=3,
            head_dim=12,
            attention_bias=True,
            mlp_bias=True,
            max_position_embeddings=128,
            rms_norm_eps=1e-6,
            eos_token_id=None,
            bos_token_id=None,
        ),
    ),
    "qwen2-tied": (
        "Qwen2ForCausalLM",
        dict(rope_theta=1000000.0, rope_type="default"),
        dict(
            vocab_size=103,
            hidden_size=28,
            intermediate_size=44,
            num_hidden_layers=2,
            num_attention_heads=7,
            num_key_value_heads=1,
            max_position_embeddings=128,
            tie_word_embeddings=True,
            eos_token_id=None,
            bos_token_id=None,
        ),
    ),
    "mistral": (
        "MistralForCausalLM",
        dict(rope_theta=10000.0, rope_type="default"),
        dict(
            vocab_size=89,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            sliding_window=None,
            max_position_embeddings=128,
            eos_token_id=None,
            bos_token_id=None,
        ),
    ),
}


def randomise(model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.2)
    return model


@torch.no_grad()
def hf_run(model, prompt, new_tokens=NEW_TOKENS):
    """Prefill logits, greedy ids and the logits of each decode step, from a full recompute."""
    ids = list(prompt)
    prefill = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    tokens = [int(prefill[-1].argmax())]
    while len(tokens) < new_tokens:
        logits = model(input_ids=torch.tensor([ids + tokens])).logits[0, -1].numpy()
        tokens.append(int(logits.argmax()))
    full = model(input_ids=torch.tensor([ids + tokens])).logits[0].numpy()
    return prefill, tokens, full[len(ids) :]


def compare(config, weights, prompt, prefill, tokens, steps):
    ref = ReferenceModel(config, weights)
    got = ref.prefill(prompt)
    err = float(np.abs(got - prefill).max())
    assert err < ATOL, f"prefill logits differ by {err}"
    for i, t in enumerate(tokens):
        step = ref.decode(t)
        err = max(err, float(np.abs(step - steps[i]).max()))
        assert err < ATOL, f"decode step {i} differs by {err}"
    assert ReferenceModel(config, weights).generate(prompt, len(tokens), stop_ids=()) == tokens
    return err


@pytest.mark.parametrize("case", list(CASES))
def test_reference_matches_live_transformers(case, tmp_path):
    cls_name, rope, kwargs = CASES[case]
    cls, config = hf_config(cls_name, rope, **kwargs)
    model = randomise(cls(config).to(torch.float32).eval(), seed=len(case))
    model.save_pretrained(tmp_path)
    ours, weights = load_checkpoint(tmp_path)
    assert ours.family == cls_name[: -len("ForCausalLM")].lower()
    prompt = np.random.default_rng(0).integers(0, ours.vocab_size, size=40).tolist()
    prefill, tokens, steps = hf_run(model, prompt)
    err = compare(ours, weights, prompt, prefill, tokens, steps)
    print(f"{case}: max |logit diff| {err:.2e}")


def test_transformers_reads_our_model_dirs(tmp_path):
    config = ModelConfig(
        family="llama",
        vocab_size=150,
        hidden_size=40,
        intermediate_size=72,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=10,
        rope_theta=500000.0,
        max_position_embeddings=256,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    )
    weights = {k: v * (10.0 if v.ndim == 2 else 1.0) for k, v in random_weights(config, 7).items()}
    save_model_dir(tmp_path, config, weights)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    prompt = list(range(3, 43))
    prefill, tokens, steps = hf_run(model, prompt)
    compare(config, weights, prompt, prefill, tokens, steps)


def test_bfloat16_checkpoint_is_read_exactly(tmp_path):
    cls_name, rope, kwargs = CASES["qwen2-tied"]
    cls, config = hf_config(cls_name, rope, **kwargs)
    model = randomise(cls(config), seed=9).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    ckpt = Checkpoint(tmp_path)
    assert ckpt.config.dtype == "bfloat16"
    assert {ckpt.dtype(n) for n in ckpt} == {"BF16"}
    params = dict(model.named_parameters())
    for name in ckpt:
        np.testing.assert_array_equal(ckpt[name], params[name].detach().float().numpy())


@pytest.mark.parametrize("case", list(CASES))
def test_mesh_model_matches_live_transformers(case, tmp_path):
    """The whole mesh path (prefill on a 3x2 mesh, hand-off, decode on 2x3) against transformers,
    in one process: every bias, RoPE scaling, GQA/MHA, tied embeddings, head_dim * heads !=
    hidden."""
    from llm.engine.model import MeshModel

    cls_name, rope, kwargs = CASES[case]
    cls, config = hf_config(cls_name, rope, **kwargs)
    model = randomise(cls(config).to(torch.float32).eval(), seed=len(case))
    model.save_pretrained(tmp_path)
    ours, weights = load_checkpoint(tmp_path)
    prompt = np.random.default_rng(0).integers(0, ours.vocab_size, size=40).tolist()
    prefill, tokens, steps = hf_run(model, prompt)
    mesh = MeshModel.from_weights(ours, weights, None, decode_mesh=(2, 3), prefill_mesh=(3, 2))
    mesh.start(mesh.capacity_for(len(prompt) + len(tokens)))
    logits, every = mesh.prefill(prompt, all_logits=True)
    err = float(np.abs(every - prefill).max())
    got = []
    for i in range(len(tokens)):
        got.append(mesh.pick(logits))
        logits = mesh.decode(got[-1])
        err = max(err, float(np.abs(mesh.logits_to_host(logits) - steps[i]).max()))
    assert got == tokens
    assert err < ATOL, f"logits differ by {err}"
    print(f"{case}: mesh max |logit diff| {err:.2e}")
