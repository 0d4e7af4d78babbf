"""Where every weight tile lives on the mesh, phase by phase.

:mod:`.layout` fixes the padded sizes and the tile split of a model on a ``Py x Px`` core mesh
(``PhaseLayout``); :mod:`.decode_tiles` (decode) and :mod:`.prefill_tiles` (prefill) cut the
HF tensors into per-core tiles, one layer walk each, and give their tile shapes without
weights; :mod:`.phase_tiles` is the registry that maps a phase to its tiles; :mod:`.footprint`
counts the words per core of those tiles and of a KV slot; :mod:`.streamed` places tiles from
a lazily read checkpoint rank by rank. Pure functions of shapes and arrays: no MPI, no files.
Imports :mod:`llm.modeling` and :mod:`meshrt` only.
"""
