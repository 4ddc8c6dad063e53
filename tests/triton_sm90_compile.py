"""Compile every softmax / norm kernel for sm_90a as a real launch at the benchmark shapes would
specialize it (16-byte aligned pointers, sizes and strides divisible by 16, unit stride along the
contiguous dim) and print one JSON line per kernel: registers, spill bytes
and the global load/store widths in the PTX. Needs no GPU: Triton's bundled ptxas does the
work. Run with TRITON_INTERPRET unset (tests/test_triton_norms.py runs it in a subprocess)."""

import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from fusedformer.kernels import _rows
from fusedformer.kernels import layer_norm as kl
from fusedformer.kernels import softmax as ks
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

ALIGNED = {"N", "M", "n_rows", "n_a", "n_b", "sxc", "syc", "sdc", "sx", "sy", "sr", "so", "sdy", "sdx", "sdr",
           "sxa", "sya", "sda", "sxb", "syb", "sdb"}
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def compile_kernel(label, fn, ptrs, floats, constexprs, num_warps):
    names = fn.arg_names
    sig = {n: "constexpr" if n in constexprs else "*" + ptrs[n] if n in ptrs else "fp32" if n in floats else "i32"
           for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if sig[n][0] == "*" or n in ALIGNED}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in constexprs.items()},
                    attrs=attrs)
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps}).asm["ptx"]
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    log = subprocess.run([PTXAS, "-v", "--gpu-name=sm_90a", f.name, "-o", os.devnull], capture_output=True,
                         text=True).stderr
    os.unlink(f.name)
    spill = re.search(r"(\d+) bytes spill stores", log)
    print(json.dumps({"kernel": label, "regs": int(re.search(r"Used (\d+) registers", log).group(1)),
                      "spill": int(spill.group(1)) if spill else 0,
                      "mem": sorted(set(re.findall(r"((?:ld|st)\.global\S*)", ptx)))}))


def main(N):
    bf = "bf16"
    for backward in (False, True):
        bm, bn, single, w = _rows.row_config(4096, N, 2, backward)
        blocks = dict(BLOCK_M=bm, BLOCK_N=bn, SINGLE=single)
        if not backward:
            *_, softmax_warps, head = ks.forward_rows_config(4096, N, 2)
            compile_kernel("softmax_fwd_rows", ks._softmax_fwd_rows_kernel, {"X": bf, "Y": bf}, (),
                           dict(blocks, HEAD=head, sxc=1, syc=1), softmax_warps)
            for label, rms in (("layer_norm_fwd", False), ("rms_norm_fwd", True)):
                compile_kernel(label, kl._norm_fwd_kernel,
                               dict(X=bf, R=bf, W=bf, B=bf, Y=bf, RES_OUT=bf, MEAN="fp32", RSTD="fp32"), ("eps",),
                               dict(blocks, IS_RMS=rms, HAS_RES=True, HAS_W=True, HAS_B=not rms), w)
        else:
            compile_kernel("softmax_bwd_rows", ks._softmax_bwd_rows_kernel, {"DY": bf, "Y": bf, "DX": bf}, (),
                           dict(blocks, sdc=1, syc=1, sxc=1), w)
            for label, rms in (("layer_norm_bwd", False), ("rms_norm_bwd", True)):
                compile_kernel(label, kl._norm_bwd_kernel,
                               dict(DY=bf, X=bf, W=bf, MEAN="fp32", RSTD="fp32", C1="fp32", C2="fp32", DRES=bf,
                                    DX=bf, DW_PART="fp32", DB_PART="fp32"), (),
                               dict(blocks, IS_RMS=rms, HAS_W=True, HAS_B=not rms, HAS_DRES=True), w)
                if not single:  # rows past one tile: the per-row reductions run first
                    compile_kernel(label + "_stats", kl._norm_bwd_stats_kernel,
                                   dict(DY=bf, X=bf, W=bf, MEAN="fp32", RSTD="fp32", C1="fp32", C2="fp32"), (),
                                   dict(BLOCK_M=bm, BLOCK_N=bn, IS_RMS=rms, HAS_W=True), w)
    bb, bn, single, w = ks._columns_config(128, N)
    compile_kernel("softmax_fwd_cols", ks._softmax_fwd_cols_kernel, {"X": bf, "Y": bf}, (),
                   dict(BLOCK_N=bn, BLOCK_B=bb, SINGLE=single, sxb=1, syb=1), w)
    compile_kernel("softmax_bwd_cols", ks._softmax_bwd_cols_kernel, {"DY": bf, "Y": bf, "DX": bf}, (),
                   dict(BLOCK_N=bn, BLOCK_B=bb, SINGLE=single, sdb=1, syb=1, sxb=1), w)
    compile_kernel("sum_partials", _rows._sum_partials_kernel, {"P": "fp32", "OUT": bf}, (),
                   dict(BLOCK_G=32, BLOCK_N=64), 4)


if __name__ == "__main__":
    for n in sys.argv[1:]:
        main(int(n))
