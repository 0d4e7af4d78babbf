"""Modeled cost on a real wafer: placement, closed-form time, calibration.

:mod:`.wafer` is the one placement of a model on the wafer (stages, folded regions from
:mod:`.regions`, remainder stages, wafers, memory per core, KV capacity); :mod:`.memory_budget`
prints it for ``llm plan``; :mod:`.estimate` gives closed-form cycle counts of prefill and decode
from the kernels' cost models; :mod:`.predict` combines them with the placement into TTFT / TPOT
/ TPR; :mod:`.breakdown` splits a layer by kernel; :mod:`.calibration` derives the device
constants. Arithmetic only, no emulation and no MPI. Imports the rooms below it (modeling ..
engine) and :mod:`meshrt`.
"""
