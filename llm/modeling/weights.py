"""The tensors a model config needs: the shape check of a set of weights, and the LM head.

Pure functions of a :class:`~llm.modeling.config.ModelConfig` and a mapping of HF tensor names;
the readers of :mod:`llm.storage` and the reference model check their weights with them.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .config import ModelConfig


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt or does not match its config."""


def check_weights(config: ModelConfig, shapes: Mapping) -> None:
    """Raise :class:`CheckpointError` unless ``shapes`` (name -> shape, or name -> array) holds
    exactly the tensors ``config`` needs, with the right shapes.

    The counts are compared first, from the config's sizes alone: a config that claims far more
    layers than the checkpoint holds is refused before its tensor list is made.
    """
    have = {k: tuple(getattr(v, "shape", v)) for k, v in shapes.items()}
    need = tensor_count(config)
    if need > len(have):
        layers = {k.split(".")[2] for k in have if k.startswith("model.layers.")}
        raise CheckpointError(
            f"the {config.family} config needs {need} tensors ({config.num_layers} layers) but "
            f"the checkpoint holds {len(have)} (tensors of {len(layers)} layers): is the config "
            "damaged, or from another model?"
        )
    want = config.tensor_shapes()
    missing = [k for k in want if k not in have]
    extra = [k for k in have if k not in want]
    wrong = [
        f"{k}: {have[k]} != expected {want[k]}"
        for k in want
        if k in have and have[k] != tuple(want[k])
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
    if extra:
        problems.append(
            f"{len(extra)} unexpected (e.g. {', '.join(extra[:3])}; does the model "
            "use a feature this reader does not support?)"
        )
    if wrong:
        problems.append(f"{len(wrong)} with wrong shapes (e.g. {'; '.join(wrong[:3])})")
    if problems:
        raise CheckpointError(
            f"weights do not match the {config.family} config: " + "; ".join(problems)
        )


def tensor_count(config: ModelConfig) -> int:
    """How many tensors :meth:`ModelConfig.tensor_shapes` lists, computed without listing them."""
    per_layer = 2 + 4 + 3  # two norms, q/k/v/o, gate/up/down
    per_layer += 3 * config.attention_bias + config.attention_out_bias + 3 * config.mlp_bias
    return 2 + config.num_layers * per_layer + (not config.tie_word_embeddings)


def lm_head_weight(config: ModelConfig, weights: Mapping) -> np.ndarray:
    """The output projection f32[vocab, hidden]: ``lm_head.weight``, or the embeddings if tied."""
    return weights["model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"]
