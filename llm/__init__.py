"""LLaMA-family inference on an emulated wafer-scale mesh.

The single-process side lives here too and needs no MPI:

* :mod:`llm.config` maps HF ``config.json`` onto a frozen :class:`~llm.config.ModelConfig`
  and holds named presets of real model shapes;
* :mod:`llm.checkpoint` reads HF safetensors (f32 / f16 / bf16) into float32 numpy arrays and
  makes deterministic random weights;
* :mod:`llm.rope`, :mod:`llm.reference`, :mod:`llm.sampling` and :mod:`llm.tokenizer` form the
  dense numpy reference model that the mesh model must match.
"""
