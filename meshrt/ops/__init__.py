"""Mesh kernels: MeshGEMM, dist-GEMM-T, MeshGEMV and their baselines."""
