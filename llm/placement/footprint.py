"""Words per core of a placement: a phase's weight tiles, and one KV-cache slot.

Pure arithmetic on the global tile shapes ``(Py, Px, *tile)`` of
:func:`llm.placement.decode_tiles.decode_tile_shapes` and
:func:`llm.placement.prefill_tiles.prefill_tile_shapes` and on a
:class:`~llm.placement.layout.PhaseLayout`; elements, not bytes (the device's word size turns
them into bytes).
"""

from __future__ import annotations

import math

from .layout import PhaseLayout


def _words(shape: tuple) -> int:
    return math.prod(shape[2:])


def weight_words_per_core(shapes: dict[str, tuple]) -> dict[str, int]:
    """Elements per core, grouped: ``embed``, ``lm_head``, ``layers`` (all), ``other``."""
    out = {"embed": 0, "lm_head": 0, "layers": 0, "other": 0}
    for name, shape in shapes.items():
        key = (
            "layers"
            if name.startswith("layer") and "/" in name
            else name
            if name in ("embed", "lm_head")
            else "other"
        )
        out[key] += _words(shape)
    return out


def kv_slot_words(lay: PhaseLayout) -> int:
    """Elements one KV slot takes on one core: K and V of ``kv/Px`` features for every layer."""
    return 2 * lay.config.num_layers * (lay.kv // lay.px)
