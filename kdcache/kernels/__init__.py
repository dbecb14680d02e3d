"""Triton kernels. Import the submodules explicitly (they import triton); nothing here does.

* ``kdcache.kernels.sparse_kd`` — fused sparse-KD loss + gradient (used by kdcache.losses).
"""
