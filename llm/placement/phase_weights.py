"""The weight registry of both phases: each phase's spec table and tile producer.

:mod:`llm.placement.mesh_weights` (decode) and :mod:`llm.placement.prefill_weights` (prefill) each
describe one
phase's tensors; this module names them per phase, so that neither phase module imports the
other's registry.
"""
from __future__ import annotations

from .mesh_weights import decode_specs, decode_tiles
from .prefill_weights import prefill_specs, prefill_tiles

#: phase -> tile producer ``f(PhaseLayout, hf_weights)`` yielding ``(name, global tiles)``.
PHASE_TILES = {"decode": decode_tiles, "prefill": prefill_tiles}
#: phase -> spec table ``f(PhaseLayout) -> {name: spec}``.
PHASE_SPECS = {"decode": decode_specs, "prefill": prefill_specs}
