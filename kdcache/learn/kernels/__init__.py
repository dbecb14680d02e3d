"""Triton kernels. Import the submodules explicitly (they import triton); nothing here does.

* ``kdcache.learn.kernels.sparse_kd`` — fused sparse-KD loss + gradient (used by kdcache.learn.losses).
"""
