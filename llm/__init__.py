"""LLaMA-family inference on an emulated wafer-scale mesh, in rooms that import one way.

Each room is a subpackage; a room may import the rooms before it in this order, never one
after it (``tests/test_imports.py`` enforces it):

1. :mod:`llm.modeling`: model config and maths, the dense numpy reference model;
2. :mod:`llm.text`: tokenizers, chat templates, sampling;
3. :mod:`llm.placement`: mesh layouts and the per-phase weight tiles;
4. :mod:`llm.storage`: checkpoint and GGUF readers, shard files, conversion, model download;
5. :mod:`llm.engine`: prefill, decode, KV cache and hand-off executed on the mesh (``MeshModel``);
6. :mod:`llm.cost`: modeled per-core memory, closed-form time and wafer placement;
7. :mod:`llm.serve`: typed options, preflight checks, generate / chat / batch / bench;
8. :mod:`llm.cli`: the commands of ``python -m llm`` (argparse lives here only).

Every room may import :mod:`meshrt` (the mesh runtime), except modeling and text, which need no
mesh at all; :mod:`meshrt` imports nothing from :mod:`llm`.
"""
