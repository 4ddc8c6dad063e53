"""benchmarks/kernel_report.py's claims stay true: what it reads from the PTX (engines), and what
it reports for attention compiled for sm_90a -- the forward on wgmma with K/V through TMA
(cp.async.bulk.tensor), dropout drawing one Philox call per four probabilities
(vocabulary.DRAWS_PER_PHILOX), and no spilling 16-bit row (the report's dropout rows here; every
other selectable config in test_triton_resources.py); head dims off multiples of 16 keep
16-byte loads."""

import importlib
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "benchmarks"))
triton = pytest.importorskip("triton")
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")

PTX = """
    cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%r1], [%rd2, {%r3, %r4}], [%r5];
    wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%f1}, %rd1, %rd2, 1, 1, 1, 0, 1;
    ld.global.v4.b32 {%r1, %r2, %r3, %r4}, [%rd3];
    ld.global.b16 %rs1, [%rd4];
    st.global.v2.b32 [%rd5], {%r6, %r7};
"""


@pytest.fixture(scope="module")
def report():
    return importlib.import_module("kernel_report")


def test_engines_read_from_ptx(report):
    got = report.engines(PTX + "    mul.lo.s32 %r9, %r8, -766435501;\n" * 20, 4)
    assert got == {"wgmma": True, "tma": True, "cp_async": False, "load": "v4", "store": "v2", "philox": 2}
    bare = report.engines("ld.global.b32 %r1, [%rd1];", 4)
    assert bare == {"wgmma": False, "tma": False, "cp_async": False, "load": "v1", "store": "-", "philox": 0}


# compiled in a subprocess without the interpreter (this process imported the kernels under it)
_REPORT_ROWS = """
import json, sys
sys.path[:0] = [{benchmarks!r}, {tests!r}]
import kernel_report
from triton_sm90_compile import compile_kernel
jobs = kernel_report.attention_jobs(kernel_report.ARCH)
picked = [next(j for j in jobs if j.family == "attention_fwd")] + [j for j in jobs if j.family.endswith("+dropout")]
for job in picked:
    got = compile_kernel(job.fn, job.types, job.constexprs, job.aligned, job.num_warps, job.num_stages, 90)
    print(json.dumps(dict(family=job.family, kernel=job.fn.__name__, config=job.config, num_warps=job.num_warps,
                          spill=got["spill"], **kernel_report.engines(got["ptx"], job.num_warps))))
"""


def _run(code, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


@pytest.mark.skipif(not os.path.exists(PTXAS), reason="triton's bundled ptxas is missing")
def test_attention_report_claims(tmp_path):
    """The bf16 forward's first selectable config, without dropout and with: wgmma both, TMA without,
    no Philox without dropout, and with it at most one call per four probabilities in each of the
    kernel's three key-tile loops (masked, whole, masked); the backward's dropout rows; no row
    spills."""
    from fusedformer.vocabulary import DRAWS_PER_PHILOX

    rows = _run(_REPORT_ROWS.format(benchmarks=os.path.join(os.path.dirname(HERE), "benchmarks"), tests=HERE),
                tmp_path)
    plain, dropout = (next(r for r in rows if r["family"] == f) for f in ("attention_fwd", "attention_fwd+dropout"))
    per_thread = dropout["config"]["BLOCK_M"] * dropout["config"]["BLOCK_N"] // (32 * dropout["num_warps"])
    assert plain["wgmma"] and dropout["wgmma"] and plain["tma"]
    assert plain["philox"] == 0
    assert 0 < dropout["philox"] <= 3 * per_thread // DRAWS_PER_PHILOX, (dropout, per_thread)
    assert {r["kernel"] for r in rows} == {"_attn_fwd_kernel", "_attn_bwd_dkdv", "_attn_bwd_dq"}
    assert not [r for r in rows if r["spill"]], rows


_ALIGNED_LOADS = r"""
import json, re, sys, torch
sys.path[:0] = [{tests!r}]
import triton_resource_jobs as J
from triton_sm90_compile import compile_kernel
from fusedformer.kernels import attention as A
from fusedformer.kernels import attention_common as C
for D in (40, 72):
    q = torch.empty(2, 4, 64, D, dtype=torch.bfloat16)  # (B, H, L, D) contiguous
    strides = [q.stride()] * 4
    for vec in (C.vector_width((q, q, q), strides), 1):
        fn = A._attn_fwd_kernel
        flags = dict(C.flags(None, True, (-1, -1), None, 0.0), VARLEN=False, IEEE_DOT=False, PACK_GQA=False,
                     USE_TMA=False, VEC=vec, BLOCK_D=C.block_d(D), BLOCK_DV=C.block_d(D), BLOCK_M=64, BLOCK_N=64,
                     **J._unit_head_dim(fn))
        # what triton specialises itself: strides divisible by 16 (the token stride D is not)
        aligned = {{f"s{{t}}_{{d}}" for t in "qkvo" for d in "bh"}}
        ptx = compile_kernel(fn, {{**J._ATTN_PTRS, **J._ATTN_SCALARS}}, flags, aligned, 4, 3, 80)["ptx"]
        cp_async_16 = re.findall(r"cp\.async\.c[ag]\.shared\.global[^;]*\], 0x10[,;]", ptx)
        print(json.dumps(dict(D=D, vec=vec, cp_async_16=len(cp_async_16), ld_v4="ld.global.v4" in ptx)))
"""


@pytest.mark.skipif(not os.path.exists(PTXAS), reason="triton's bundled ptxas is missing")
def test_head_dims_off_sixteen_keep_sixteen_byte_loads(tmp_path):
    """D = 40 and 72 (bf16, sm_80's pointer path): with the host's vector width (8 elements, every
    stride and head dim a multiple of it) the K/V tiles load by 16-byte cp.async and Q by
    ld.global.v4; without the hint (VEC = 1) neither: what the hint buys."""
    rows = _run(_ALIGNED_LOADS.format(tests=HERE), tmp_path)
    assert [(r["D"], r["vec"]) for r in rows] == [(40, 8), (40, 1), (72, 8), (72, 1)]
    for r in rows:
        assert (r["cp_async_16"] > 0 and r["ld_v4"]) == (r["vec"] > 1), r
