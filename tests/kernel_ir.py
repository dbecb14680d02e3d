"""Compile Triton kernels for an sm_90 GPU and report every float64 line of their Triton IR.

Compiling needs no GPU, only Triton's bundled compiler, so this runs on CPU-only machines. It
runs in its own process because ``TRITON_INTERPRET=1`` (which the kernel tests set) replaces
``triton.language``'s functions with the interpreter's, and those cannot build compiled IR.

Usage: ``python tests/kernel_ir.py '[[tail, labels, ce_separate, write_grad], ...]'`` prints a JSON
list with, for each variant, the IR lines that mention ``f64``; the variant ``"control"``
compiles a small kernel that sums in float64, which the check must see (its own control).
"""

from __future__ import annotations

import json
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

SIGNATURE = {
    "z_ptr": "*bf16", "stride_z": "i64", "lp_ptr": "*fp16", "stride_lp": "i64", "ids_ptr": "*i16",
    "stride_ids": "i64", "lab_ptr": "*fp32", "stride_lab": "i64", "grad_ptr": "*bf16", "stride_g": "i64",
    "loss_ptr": "*fp32", "C": "i32", "K": "i32", "inv_T": "fp32", "T": "fp32", "log_n_tail": "fp32",
    "grad_scale": "fp32", "ce_weight": "fp32", "TAIL": "constexpr", "LABELS": "constexpr",
    "CE_SEPARATE": "constexpr", "WRITE_GRAD": "constexpr", "BLOCK": "constexpr", "KBLOCK": "constexpr",
}


def float64_sum(x_ptr):
    x = tl.load(x_ptr + tl.arange(0, 16))
    tl.store(x_ptr, tl.sum(x.to(tl.float64), axis=0).to(tl.float32))


def ttir(fn, signature: dict, constexprs: dict) -> str:
    names = list(signature)
    src = ASTSource(fn=JITFunction(fn), signature=signature,
                    constexprs={(names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ttir"]


def float64_lines(ir: str) -> list[str]:
    return [line.strip() for line in ir.splitlines() if "f64" in line]


def main(variants) -> list:
    from kdcache.learn.kernels.sparse_kd import _sparse_kd_kernel

    out = []
    for v in variants:
        if v == "control":
            ir = ttir(float64_sum, {"x_ptr": "*fp32"}, {})
        else:
            tail, labels, ce_separate, write_grad = v
            sig = dict(SIGNATURE, lab_ptr="*i64" if labels == 1 else "*fp32")
            ir = ttir(_sparse_kd_kernel, sig, dict(TAIL=tail, LABELS=labels, CE_SEPARATE=bool(ce_separate),
                                                   WRITE_GRAD=bool(write_grad), BLOCK=1024, KBLOCK=16))
        if "tt.func" not in ir:
            raise SystemExit(f"no function in the IR of {v}")
        out.append(float64_lines(ir))
    return out


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
