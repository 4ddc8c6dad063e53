"""benchmarks/kernel_report.py's claims stay true: what it reads from the PTX (engines), and what
it reports for the attention forward compiled for sm_90a -- wgmma, and dropout drawing one
Philox call per four probabilities (vocabulary.DRAWS_PER_PHILOX)."""

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
_FORWARD_ROWS = """
import json, sys
sys.path[:0] = [{benchmarks!r}, {tests!r}]
import kernel_report
from triton_sm90_compile import compile_kernel
jobs = kernel_report.attention_jobs(kernel_report.ARCH)
for family in ("attention_fwd", "attention_fwd+dropout"):
    job = next(j for j in jobs if j.family == family)
    got = compile_kernel(job.fn, job.types, job.constexprs, job.aligned, job.num_warps, job.num_stages, 90)
    print(json.dumps(dict(family=family, config=job.config, num_warps=job.num_warps,
                          **kernel_report.engines(got["ptx"], job.num_warps))))
"""


@pytest.mark.skipif(not os.path.exists(PTXAS), reason="triton's bundled ptxas is missing")
def test_attention_forward_uses_wgmma_and_four_draws_per_philox_call(tmp_path):
    """The bf16 forward's first selectable config without dropout, and with: wgmma both, no Philox
    without dropout, and with it at most one call per four probabilities in each of the kernel's
    three key-tile loops (masked, whole, masked)."""
    from fusedformer.vocabulary import DRAWS_PER_PHILOX

    code = _FORWARD_ROWS.format(benchmarks=os.path.join(os.path.dirname(HERE), "benchmarks"), tests=HERE)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    plain, dropout = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    per_thread = dropout["config"]["BLOCK_M"] * dropout["config"]["BLOCK_N"] // (32 * dropout["num_warps"])
    assert plain["wgmma"] and dropout["wgmma"]
    assert plain["philox"] == 0
    assert 0 < dropout["philox"] <= 3 * per_thread // DRAWS_PER_PHILOX, (dropout, per_thread)
