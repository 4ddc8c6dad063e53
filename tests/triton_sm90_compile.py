"""Compile fusedformer's Triton kernels for a GPU target without a GPU and report what they use.

Needs no GPU: Triton's compiler and bundled ptxas do the work, so run it with TRITON_INTERPRET
unset (the test processes run the interpreter and call this in a subprocess):

  python triton_sm90_compile.py N [N ...]
      the softmax / norm kernels for sm_90a as a real launch at row length N would specialise them
      (16-byte aligned pointers, sizes and strides divisible by 16, unit stride along the contiguous
      dim): one JSON line per kernel with registers, spill bytes and the PTX's global load/store
      widths (tests/test_triton_norms.py).
  python triton_sm90_compile.py --resources SHARD SHARDS [--plant]
      shard SHARD of SHARDS of every configuration autotune may select, one representative
      specialisation per kernel (triton_resource_jobs.py), for sm_90a and sm_80: one JSON line per
      (kernel, config, arch) with shared memory, registers and spill bytes
      (tests/test_triton_resources.py). --plant adds a GEMM config too large for shared memory.
"""

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
ALIGNED = {"N", "M", "n_rows", "n_a", "n_b", "sxc", "syc", "sdc", "sx", "sy", "sr", "so", "sdy", "sdx", "sdr",
           "sxa", "sya", "sda", "sxb", "syb", "sdb"}


def compile_kernel(fn, types, constexprs, aligned, num_warps, num_stages=None, arch=90):
    """Compile ``fn`` for sm_<arch> (sm_90a for 90). ``types`` maps argument names to Triton
    signature types ("*bf16", "fp32", "tensordesc<...>"); the others are i32, those in ``aligned``
    (and every pointer) divisible by 16. Returns {shared, regs, spill, ptx}: shared memory bytes per
    block, and registers and spill-store bytes per thread from the compile's own ptxas run."""
    names = fn.arg_names
    sig = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if sig[n].startswith("*") or (n in aligned and sig[n] == "i32")}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in constexprs.items()},
                    attrs=attrs)
    options = {"num_warps": num_warps} if num_stages is None else {"num_warps": num_warps, "num_stages": num_stages}
    triton.knobs.nvidia.dump_ptxas_log = True  # ptxas -v's report, printed to stdout
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    report = log.getvalue()
    if "Used" not in report:  # a compile from triton's cache skipped ptxas: run it for the report
        report = ptxas_report(kernel.asm["ptx"], arch)
    regs = re.search(r"Used (\d+) registers", report)
    spill = re.search(r"(\d+) bytes spill stores", report)
    return {"shared": kernel.metadata.shared, "regs": int(regs.group(1)),
            "spill": int(spill.group(1)) if spill else 0, "ptx": kernel.asm["ptx"]}


def ptxas_report(ptx, arch):
    """ptxas -v's resource report of ``ptx`` for sm_<arch> (sm_90a for 90)."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        return subprocess.run([PTXAS, "-v", f"--gpu-name={gpu}", f.name, "-o", os.devnull], capture_output=True,
                              text=True, check=True).stderr
    finally:
        os.unlink(f.name)


def print_norm_kernel(label, fn, ptrs, floats, constexprs, num_warps):
    types = {**{n: "*" + t for n, t in ptrs.items()}, **{n: "fp32" for n in floats}}
    got = compile_kernel(fn, types, constexprs, ALIGNED, num_warps)
    print(json.dumps({"kernel": label, "regs": got["regs"], "spill": got["spill"],
                      "mem": sorted(set(re.findall(r"((?:ld|st)\.global\S*)", got["ptx"])))}))


def norm_kernels(N):
    """(label, kernel, pointer dtypes, float args, constexprs, num_warps) of every softmax / norm
    kernel as launched on 4096 bf16 rows of length N."""
    from fusedformer.kernels import _rows
    from fusedformer.kernels import softmax as ks

    bf = "bf16"
    out = []
    for backward in (False, True):
        bm, bn, single, w = _rows.row_config(4096, N, 2, backward)
        out += row_kernels(dict(BLOCK_M=bm, BLOCK_N=bn, SINGLE=single), w, backward)
    bb, bn, single, w = ks._columns_config(128, N)
    out += column_kernels(dict(BLOCK_N=bn, BLOCK_B=bb, SINGLE=single), w)
    out.append(("sum_partials", _rows._sum_partials_kernel, {"P": "fp32", "OUT": bf}, (),
                dict(BLOCK_G=32, BLOCK_N=64), 4))
    return out


def row_kernels(blocks, num_warps, backward, bf="bf16"):
    """The row-wise softmax / norm kernels of one direction at ``blocks`` (row_config's choice):
    layer and RMS norm are one kernel each way (IS_RMS); a looped softmax forward runs with its held
    head's warps, and a looped norm backward adds its row-statistics kernels."""
    from fusedformer.kernels import layer_norm as kl
    from fusedformer.kernels import softmax as ks

    if not backward:
        elem_bytes = {"bf16": 2, "fp16": 2, "fp32": 4}[bf]
        head, softmax_warps = (blocks["BLOCK_N"], num_warps) if blocks["SINGLE"] else ks.held_head(elem_bytes)
        out = [("softmax_fwd_rows", ks._softmax_fwd_rows_kernel, {"X": bf, "Y": bf}, (),
                dict(blocks, HEAD=head, sxc=1, syc=1), softmax_warps)]
        for label, rms in (("layer_norm_fwd", False), ("rms_norm_fwd", True)):
            out.append((label, kl._norm_fwd_kernel,
                        dict(X=bf, R=bf, W=bf, B=bf, Y=bf, RES_OUT=bf, MEAN="fp32", RSTD="fp32"), ("eps",),
                        dict(blocks, IS_RMS=rms, HAS_RES=True, HAS_W=True, HAS_B=not rms), num_warps))
        return out
    out = [("softmax_bwd_rows", ks._softmax_bwd_rows_kernel, {"DY": bf, "Y": bf, "DX": bf}, (),
            dict(blocks, sdc=1, syc=1, sxc=1), num_warps)]
    for label, rms in (("layer_norm_bwd", False), ("rms_norm_bwd", True)):
        out.append((label, kl._norm_bwd_kernel,
                    dict(DY=bf, X=bf, W=bf, MEAN="fp32", RSTD="fp32", C1="fp32", C2="fp32", DRES=bf, DX=bf,
                         DW_PART="fp32", DB_PART="fp32"), (),
                    dict(blocks, IS_RMS=rms, HAS_W=True, HAS_B=not rms, HAS_DRES=True), num_warps))
        if not blocks["SINGLE"]:  # rows past one tile: the per-row reductions run first
            out.append((label + "_stats", kl._norm_bwd_stats_kernel,
                        dict(DY=bf, X=bf, W=bf, MEAN="fp32", RSTD="fp32", C1="fp32", C2="fp32"), (),
                        dict(BLOCK_M=blocks["BLOCK_M"], BLOCK_N=blocks["BLOCK_N"], IS_RMS=rms, HAS_W=True), num_warps))
    return out


def column_kernels(blocks, num_warps, bf="bf16"):
    from fusedformer.kernels import softmax as ks

    return [("softmax_fwd_cols", ks._softmax_fwd_cols_kernel, {"X": bf, "Y": bf}, (), dict(blocks, sxb=1, syb=1),
             num_warps),
            ("softmax_bwd_cols", ks._softmax_bwd_cols_kernel, {"DY": bf, "Y": bf, "DX": bf}, (),
             dict(blocks, sdb=1, syb=1, sxb=1), num_warps)]


def resources(shard, shards, plant):
    import triton_resource_jobs

    jobs = triton_resource_jobs.jobs(plant)
    for job in jobs[shard::shards]:
        got = compile_kernel(job.fn, job.types, job.constexprs, job.aligned, job.num_warps, job.num_stages, job.arch)
        config = dict(job.config, num_warps=job.num_warps, **({"num_stages": job.num_stages} if job.num_stages else {}))
        print(json.dumps({"family": job.family, "kernel": job.fn.__name__, "config": config, "arch": job.arch,
                          "sixteen_bit": job.sixteen_bit, "shared": got["shared"], "regs": got["regs"],
                          "spill": got["spill"]}), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "--resources":
        resources(int(sys.argv[2]), int(sys.argv[3]), "--plant" in sys.argv)
    else:
        for n in sys.argv[1:]:
            for label, fn, ptrs, floats, constexprs, num_warps in norm_kernels(int(n)):
                print_norm_kernel(label, fn, ptrs, floats, constexprs, num_warps)
