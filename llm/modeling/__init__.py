"""Model maths and configuration: what a LLaMA-family model is, independent of any mesh.

:mod:`.config` maps HF ``config.json`` onto a frozen ``ModelConfig`` (and holds presets of real
model shapes); :mod:`.functional` and :mod:`.rope` are the numpy building blocks (RMSNorm,
SiLU, softmax, rotary embeddings) shared by the reference and the mesh engines;
:mod:`.reference` is the dense single-process model every mesh run is checked against.
No MPI and no mesh. The bottom room: imports numpy, nothing from :mod:`meshrt` and nothing
else from :mod:`llm`.
"""
