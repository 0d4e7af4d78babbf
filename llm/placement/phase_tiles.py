"""The weight registry of both phases: each phase's spec table and tile producer.

:mod:`llm.placement.decode_tiles` (decode) and :mod:`llm.placement.prefill_tiles` (prefill)
each describe one phase's tensors; this module names them per phase, so that neither phase
module imports the other's registry.
"""

from __future__ import annotations

from .decode_tiles import decode_specs, decode_tiles
from .prefill_tiles import prefill_specs, prefill_tiles

#: phase -> tile producer ``f(PhaseLayout, hf_weights)`` yielding ``(name, global tiles)``.
PHASE_TILES = {"decode": decode_tiles, "prefill": prefill_tiles}
#: phase -> spec table ``f(PhaseLayout) -> {name: spec}``.
PHASE_SPECS = {"decode": decode_specs, "prefill": prefill_specs}
