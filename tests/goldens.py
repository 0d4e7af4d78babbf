"""The checked-in golden fixtures: tiny HF checkpoints and transformers' outputs on them.

``tests/fixtures/<name>/`` holds ``config.json``, ``model.safetensors`` and ``expected.npz``
(written by ``tools/make_fixtures.py``); every test that needs them finds them here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from llm.storage.checkpoint import load_checkpoint

FIXTURES = Path(__file__).resolve().parent / "fixtures"
GOLDEN_MODELS = ("tiny-llama-gqa", "tiny-qwen2")
#: logits tolerance against the goldens: ten times what transformers itself varies by (8.7e-6
#: between its cached and uncached runs).
ATOL = 1e-4


def golden(name: str):
    """``(config, weights, expected)`` of fixture ``name``; ``expected`` maps the names in
    ``expected.npz`` (``prompt_ids``, ``prefill_logits``, ``greedy_ids``, ...) to arrays."""
    config, weights = load_checkpoint(FIXTURES / name)
    with np.load(FIXTURES / name / "expected.npz") as z:
        expected = {k: z[k] for k in z.files}
    return config, weights, expected
