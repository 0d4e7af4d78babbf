"""Execution on the mesh: the model placed on emulated cores, prefill and decode.

:mod:`.program` names the per-layer steps both phases run, :mod:`.prefill` (MeshGEMM) and
:mod:`.decode` (MeshGEMV) execute them on a ``meshrt.fabric.Fabric``, :mod:`.kvcache` holds
the distributed KV cache, :mod:`.handoff` moves the KV cache from the prefill mesh to the decode
mesh, and :mod:`.model` (``MeshModel``) ties them together. Imports the rooms below it
(modeling, text, placement, storage) and :mod:`meshrt`.
"""
