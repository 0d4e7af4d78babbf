"""Build the golden fixtures in ``tests/fixtures/`` with HF transformers (the external oracle).

Needs the oracle venv (torch + transformers; see ``requirements-oracle.txt``)::

    python3 -m venv .venv-oracle
    .venv-oracle/bin/pip install torch==2.13.0          # first, so no CUDA build is pulled
    .venv-oracle/bin/pip install -r requirements-oracle.txt
    .venv-oracle/bin/python tools/make_fixtures.py

For each tiny random-weight model it writes ``tests/fixtures/<name>/``:

* ``config.json`` and ``model.safetensors`` (float32), from ``save_pretrained``;
* ``expected.npz`` with
  ``prompt_ids`` int64[T], ``prefill_logits`` f32[T, vocab],
  ``greedy_ids`` int64[N] (greedy continuation, never stopped by EOS),
  ``decode_logits`` f32[N, vocab] (row ``i``: logits after feeding ``greedy_ids[i]`` at position
  ``T + i``, so ``greedy_ids[i + 1] == argmax(decode_logits[i])``),
  ``meta`` (a JSON string: library versions, margins, how the numbers were made);
* for ``tiny-llama-gqa`` also a small ``tokenizer.json`` (character BPE) trained offline.

Model sizes are chosen so that 2x2, 3x2 and 4x4 meshes do not divide most dimensions.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NEW_TOKENS = 16
INIT_STD = 0.2  # much larger than HF's 0.02, so logits are far from flat

MODELS = {
    # LLaMA with GQA (6 query heads on 2 KV heads) and llama3 RoPE scaling whose
    # original_max_position_embeddings is small enough that head_dim 8 has a short, a medium and
    # two long wavelengths: every branch of the scaling is used.
    "tiny-llama-gqa": dict(
        cls="LlamaForCausalLM",
        seed=1234,
        config=dict(
            vocab_size=157,
            hidden_size=48,
            intermediate_size=70,
            num_hidden_layers=3,
            num_attention_heads=6,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=256,
            rms_norm_eps=1e-5,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=10000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
            bos_token_id=1,
            eos_token_id=2,
            tie_word_embeddings=False,
        ),
        prompt=[1, 45, 102, 7, 150, 33, 88, 12, 61, 140, 99],
    ),
    # Qwen2: q/k/v biases, tied embeddings, one KV head for five query heads.
    "tiny-qwen2": dict(
        cls="Qwen2ForCausalLM",
        seed=4321,
        config=dict(
            vocab_size=151,
            hidden_size=40,
            intermediate_size=66,
            num_hidden_layers=2,
            num_attention_heads=5,
            num_key_value_heads=1,
            max_position_embeddings=128,
            rms_norm_eps=1e-6,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0),
            bos_token_id=148,
            eos_token_id=[149, 150],
            tie_word_embeddings=True,
            use_sliding_window=False,
        ),
        prompt=[148, 3, 77, 120, 54, 9, 131, 66, 23],
    ),
}

TOKENIZER_TEXT = [
    "the wafer is a mesh of small cores that talk to their neighbours",
    "each core holds a tile of the weights and a slice of the cache",
    "tokens flow in at the edge and logits flow out again",
    "a ring of cores passes partial sums along the rows and columns",
    "the model reads the prompt then writes one token at a time",
]


def build_model(spec: dict):
    """A float32 model with random weights drawn from the spec's seed."""
    cls = getattr(transformers, spec["cls"])
    kwargs = dict(spec["config"])
    if int(transformers.__version__.split(".")[0]) < 5:
        # transformers 4 spells the RoPE settings as rope_theta + rope_scaling.
        rope = dict(kwargs.pop("rope_parameters"))
        kwargs["rope_theta"] = rope.pop("rope_theta")
        kwargs["rope_scaling"] = rope if rope["rope_type"] != "default" else None
    config = cls.config_class(**kwargs)
    torch.manual_seed(spec["seed"])
    model = cls(config).to(torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, INIT_STD)
    return model


@torch.no_grad()
def run_oracle(model, prompt: list[int]) -> dict:
    """Prefill, then greedy decode with the KV cache, recording every step's logits."""
    # The KV cache is updated in place; its keyword is "cache" in recent transformers.
    cache_kw = (
        "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    )
    cache = transformers.DynamicCache(config=model.config)
    out = model(input_ids=torch.tensor([prompt]), use_cache=True, **{cache_kw: cache})
    prefill = out.logits[0].float().numpy().copy()
    tokens, steps = [int(prefill[-1].argmax())], []
    for _ in range(NEW_TOKENS):
        out = model(input_ids=torch.tensor([[tokens[-1]]]), use_cache=True, **{cache_kw: cache})
        steps.append(out.logits[0, -1].float().numpy().copy())
        if len(tokens) < NEW_TOKENS:
            tokens.append(int(steps[-1].argmax()))
    # The same sequence without a cache must agree with the cached steps.
    full = model(input_ids=torch.tensor([prompt + tokens])).logits[0].float().numpy()
    cache_vs_full = float(np.abs(full[len(prompt) :] - np.stack(steps)).max())
    all_logits = np.concatenate([prefill[-1:], np.stack(steps[:-1])])
    top2 = np.sort(all_logits, axis=-1)[:, -2:]
    return dict(
        prefill_logits=prefill,
        greedy_ids=np.array(tokens, dtype=np.int64),
        decode_logits=np.stack(steps).astype(np.float32),
        cache_vs_full=cache_vs_full,
        min_margin=float((top2[:, 1] - top2[:, 0]).min()),
    )


def build_tokenizer(path: Path, vocab_size: int) -> None:
    """A character-level BPE with <unk>=0, <s>=1, </s>=2 that prepends <s> to every encoding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    tok.train_from_iterator(TOKENIZER_TEXT, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    assert tok.token_to_id("<s>") == 1 and tok.token_to_id("</s>") == 2
    assert tok.get_vocab_size() <= vocab_size
    tok.save(str(path))


def check_with_reference(model_dir: Path, expected: dict) -> dict:
    """Compare this repository's numpy reference model with the oracle (for the report)."""
    sys.path.insert(0, str(ROOT))
    from llm.modeling.reference import ReferenceModel
    from llm.storage.checkpoint import load_checkpoint

    config, weights = load_checkpoint(model_dir)
    ref = ReferenceModel(config, weights)
    prefill = ref.prefill(expected["prompt_ids"])
    steps = np.stack([ref.decode(t) for t in expected["greedy_ids"]])
    ids = ReferenceModel(config, weights).generate(expected["prompt_ids"], NEW_TOKENS, stop_ids=())
    return dict(
        prefill_max_abs=float(np.abs(prefill - expected["prefill_logits"]).max()),
        decode_max_abs=float(np.abs(steps - expected["decode_logits"]).max()),
        greedy_equal=ids == expected["greedy_ids"].tolist(),
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures")
    parser.add_argument(
        "--no-check", action="store_true", help="skip the comparison with llm.modeling.reference"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for name, spec in MODELS.items():
        model = build_model(spec)
        result = run_oracle(model, spec["prompt"])
        final = args.out / name
        tmp = args.out / (name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        if name == "tiny-llama-gqa":
            build_tokenizer(tmp / "tokenizer.json", spec["config"]["vocab_size"])
        meta = dict(
            source="tools/make_fixtures.py",
            model=spec["cls"],
            seed=spec["seed"],
            init_std=INIT_STD,
            torch=torch.__version__,
            transformers=transformers.__version__,
            attn_implementation=model.config._attn_implementation,
            cache_vs_full_max_abs=result["cache_vs_full"],
            min_top1_top2_margin=result["min_margin"],
        )
        expected = dict(
            prompt_ids=np.array(spec["prompt"], dtype=np.int64),
            prefill_logits=result["prefill_logits"].astype(np.float32),
            greedy_ids=result["greedy_ids"],
            decode_logits=result["decode_logits"],
        )
        np.savez(tmp / "expected.npz", meta=np.array(json.dumps(meta)), **expected)
        for path in tmp.iterdir():
            path.chmod(0o644)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        size = sum(p.stat().st_size for p in final.iterdir())
        print(f"{name}: {size / 1024:.0f} KB, files {sorted(p.name for p in final.iterdir())}")
        print(f"  greedy {result['greedy_ids'].tolist()}")
        print(
            f"  cache vs no-cache max |diff| {result['cache_vs_full']:.2e}, "
            f"min top1-top2 margin {result['min_margin']:.3f}, "
            f"logit std {result['prefill_logits'].std():.2f}"
        )
        if not args.no_check:
            print(f"  llm.modeling.reference: {check_with_reference(final, expected)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
