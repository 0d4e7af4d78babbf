"""Weights on disk: checkpoint and GGUF readers, the per-rank shard format, conversion.

:mod:`.checkpoint` reads HF safetensors (and makes deterministic random weights),
:mod:`.gguf_source` and :mod:`.gguf_tokenizer` read GGUF files, :mod:`.shards` is the per-rank
HDF5 shard set (format, manifest, reader), :mod:`.shard_writer` writes it and :mod:`.convert`
turns a model into one; :mod:`.fetch` downloads a pinned model. Collective steps go through a
``meshrt.runtime.ControlPlane``. Imports :mod:`llm.modeling`, :mod:`llm.text`,
:mod:`llm.placement` and :mod:`meshrt`.
"""
