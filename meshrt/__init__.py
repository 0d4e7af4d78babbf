"""meshrt: a wafer-scale mesh emulated by MPI ranks.

Layers (imports point down only)::

    ops          MeshGEMM, dist-GEMM-T, MeshGEMV and the SUMMA / Cannon / allreduce baselines
    movers       the exact and aggregated emulation of the kernels' data movement (the
                 interface is at the bottom: the fabric holds a mover, chosen once)
    collectives  chain reduce, broadcast, ring / pipeline / K-tree allreduce along x or y
    hostio       scatter/gather of tiled matrices between the host and the mesh (control plane)
    fabric       the only data-plane MPI user: neighbour exchange, relays, tracing
    mesh         pure maths: layouts, tiling, padding, the interleaved ring
    plmr         devices and the cost ledger
    runtime      the control plane (ControlPlane: rank, broadcasts, agreement on errors),
                 MPI start-up, rank-0 logging
"""

from importlib.metadata import PackageNotFoundError, version

from .mesh import MeshError, MeshLayout
from .movers import aggregated, exact  # noqa: F401  (the movers register themselves)
from .plmr import PRESETS, Device, Ledger, get_device
from .runtime import Comm, ControlPlane

try:  # The version is written once, in pyproject.toml; an installed package carries it.
    __version__ = version("waferllm-mpi")
except PackageNotFoundError:  # a source tree on sys.path, never installed
    __version__ = "0+unknown"
__all__ = [
    "MeshError",
    "MeshLayout",
    "PRESETS",
    "Device",
    "Ledger",
    "get_device",
    "ControlPlane",
    "Comm",
    "__version__",
]
