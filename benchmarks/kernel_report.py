"""What each selectable Triton configuration compiles to on sm_90a, without a GPU.

    python benchmarks/kernel_report.py [--out benchmarks/results] [--family attention ...]

compiles every configuration autotune may select (tests/triton_resource_jobs.py reads them from
the kernels' own autotuners) with Triton's compiler and bundled ptxas, and writes one table row
per (kernel, config): registers, spill bytes, shared memory, and which engines the PTX uses --
wgmma (Hopper tensor cores), TMA (cp.async.bulk.tensor), cp.async, the widest global load and
store, and the Philox calls per thread (a Philox4x32-10 call is 10 rounds, each one multiply by
the round constant 0xD2511F53; summed over every loop body the kernel compiles). The file is
benchmarks/results/kernels-sm90a-<date>.md. These are compile facts, not speed: the GPU check
measures the speed.

Families register themselves in FAMILIES (one function per family, returning compile jobs), so
each kernel family adds its rows without editing another's lines.
"""

import argparse
import datetime
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.join(os.path.dirname(HERE), "tests")
sys.path.insert(0, TESTS)

ARCH = 90
PHILOX_ROUND_A = 0xD2511F53  # Philox4x32's round multiplier of c0: one mul.lo by it per round
FAMILIES = {}  # family name -> function(arch) returning triton_resource_jobs.Job's


def family(name):
    """Register ``fn(arch) -> [Job]`` as the compile jobs of report family ``name``."""
    def register(fn):
        FAMILIES[name] = fn
        return fn
    return register


@family("attention")
def attention_jobs(arch):
    """Forward, backward (dK/dV, dQ) and decode-combine configs at head dims 128 and 64, plus the
    forward and both backward kernels with dropout at the first config selectable with dropout at
    D = 128 (the Philox column)."""
    import triton_resource_jobs as jobs_module

    jobs = jobs_module.attention_jobs(arch, head_dims=(jobs_module.HEAD_DIM, 64))
    with_dropout = jobs_module.attention_jobs(arch, dropout_p=0.1)
    for fn in dict.fromkeys(j.fn for j in with_dropout if j.family in ("attention_fwd", "attention_bwd")):
        first = next(j for j in with_dropout if j.fn is fn)
        first.family += "+dropout"
        jobs.append(first)
    return jobs


@family("gemm")
def gemm_jobs(arch):
    """The GEMM with epilogue in every variant the launcher runs (forward plain and gated, gated
    recompute backward, split-K partials; triton_resource_jobs.GEMM_VARIANTS) at each selectable
    config, and the bias + activation kernels (swiglu, adding split-K partials)."""
    import dataclasses

    import triton_resource_jobs as jobs_module

    def variant(job):  # the GEMM's rows named by what the launcher runs them for
        if job.family != "matmul_act":
            return job
        mode = {0: "forward", 1: "recompute dh", 2: "split-K partials"}[job.constexprs["MODE"]]
        return dataclasses.replace(job, family=f"matmul_act {mode}{' gated' if job.constexprs['GATED'] else ''}")

    return [variant(job) for job in jobs_module.gemm_jobs(arch)]


def engines(ptx, num_warps):
    """What the PTX uses: {wgmma, tma, cp_async, load, store, philox}."""
    def widest(op):
        widths = [int(w or 1) for w in re.findall(rf"{op}\.global(?:\.\w+)*?(?:\.v(\d))?\.[busf]\d+", ptx)]
        return f"v{max(widths)}" if widths else "-"

    # each round's low product c0 * A keeps the constant inline (the high product takes it from a register)
    constant = f"(?:{PHILOX_ROUND_A - (1 << 32)}|{PHILOX_ROUND_A})"
    rounds = len(re.findall(rf"mul\.lo\.[su]32\s+%r\d+,\s*%r\d+,\s*{constant};", ptx))
    return {"wgmma": "wgmma.mma_async" in ptx, "tma": "cp.async.bulk.tensor" in ptx,
            "cp_async": bool(re.search(r"cp\.async\.(?:ca|cg)\.shared", ptx)),
            "load": widest("ld"), "store": widest("st"), "philox": rounds // 10}


def rows(families, arch=ARCH):
    """One dict per compile job of ``families``: the kernel, its config and what it compiled to."""
    from triton_sm90_compile import compile_kernel

    out = []
    for name in families:
        for job in FAMILIES[name](arch):
            got = compile_kernel(job.fn, job.types, job.constexprs, job.aligned, job.num_warps, job.num_stages, arch)
            config = dict(job.config, num_warps=job.num_warps, **({"num_stages": job.num_stages}
                                                                  if job.num_stages else {}))
            out.append(dict(family=job.family, kernel=job.fn.__name__, config=config, sixteen_bit=job.sixteen_bit,
                            shared=got["shared"], regs=got["regs"], spill=got["spill"],
                            **engines(got["ptx"], job.num_warps)))
    return out


def markdown(report_rows, arch=ARCH):
    head = ("| family | kernel | config | regs | spill B | shared B | wgmma | TMA | cp.async | ld | st "
            "| Philox/thread |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    yes = {True: "yes", False: "-"}
    body = "".join(
        f"| {r['family']} | {r['kernel']} | {' '.join(f'{k}={v}' for k, v in r['config'].items())} | {r['regs']} | "
        f"{r['spill']} | {r['shared']} | {yes[r['wgmma']]} | {yes[r['tma']]} | {yes[r['cp_async']]} | {r['load']} | "
        f"{r['store']} | {r['philox']} |\n" for r in report_rows)
    title = f"# Triton kernels compiled for sm_{arch}a ({datetime.date.today()})\n\n"
    note = "Written by `python benchmarks/kernel_report.py`: compile facts (triton's ptxas), no timing.\n\n"
    return f"{title}{note}{head}{body}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--family", action="append", choices=sorted(FAMILIES))
    args = parser.parse_args()
    os.environ.pop("TRITON_INTERPRET", None)  # real compiles: the kernels' autotuners, not the interpreter's config
    text = markdown(rows(args.family or sorted(FAMILIES)))
    path = os.path.join(args.out, f"kernels-sm{ARCH}a-{datetime.date.today()}.md")
    with open(path, "w") as f:
        f.write(text)
    print(path)


if __name__ == "__main__":
    main()
