"""The weights check: a checkpoint's tensor names and shapes against the config."""

import pytest

from llm.modeling.config import preset
from llm.modeling.weights import CheckpointError, check_weights


def test_check_weights_reports_mismatches():
    config = preset("tiny-llama")
    shapes = dict(config.tensor_shapes())
    check_weights(config, shapes)
    del shapes["model.norm.weight"]
    shapes["model.layers.0.self_attn.q_norm.weight"] = (16,)
    shapes["lm_head.weight"] = (10, 64)
    with pytest.raises(CheckpointError, match="1 missing.*1 unexpected.*1 with wrong shapes"):
        check_weights(config, shapes)
