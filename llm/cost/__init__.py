"""Modeled cost on a real wafer: memory per core, closed-form time, wafer placement.

:mod:`.memory_budget` counts per-core memory and which meshes fit, :mod:`.estimate` gives
closed-form
cycle counts of prefill and decode from the kernels' cost models, :mod:`.wafer` places a model
(pipeline stages, shelves) on a whole wafer, :mod:`.predict` combines them into TTFT / TPOT /
TPR, and :mod:`.calibration` compares the model against reference figures. Arithmetic only, no
emulation and no MPI. Imports the rooms below it (modeling .. engine) and :mod:`meshrt`.
"""
