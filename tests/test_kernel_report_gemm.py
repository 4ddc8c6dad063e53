"""benchmarks/kernel_report.py's GEMM claims stay true: on sm_90a the GEMM with epilogue runs on
wgmma with TMA loads, its forward epilogue stores through TMA (no st.global), and no variant
spills. Representative configs only (each variant's first selectable one); every selectable
config's spills and shared memory are the resource test's (tests/test_triton_resources.py)."""

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
BENCHMARKS = os.path.join(os.path.dirname(HERE), "benchmarks")
triton = pytest.importorskip("triton")
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")

# compiled in a subprocess without the interpreter (this process imported the kernels under it)
_GEMM_ROWS = """
import json, sys
sys.path[:0] = [{benchmarks!r}, {tests!r}]
import kernel_report
from triton_sm90_compile import compile_kernel
seen = set()
for job in kernel_report.gemm_jobs(kernel_report.ARCH):
    if job.family.startswith("matmul_act") and job.family not in seen:
        seen.add(job.family)
        got = compile_kernel(job.fn, job.types, job.constexprs, job.aligned, job.num_warps, job.num_stages, 90)
        row = dict(family=job.family, spill=got["spill"], **kernel_report.engines(got["ptx"], job.num_warps))
        print(json.dumps(row))
"""


@pytest.mark.skipif(not os.path.exists(PTXAS), reason="triton's bundled ptxas is missing")
def test_gemm_uses_wgmma_and_tma_without_spills(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    code = _GEMM_ROWS.format(benchmarks=BENCHMARKS, tests=HERE)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {r["family"]: r for r in map(json.loads, (line for line in out.stdout.splitlines() if line[:1] == "{"))}
    assert set(rows) == {"matmul_act forward", "matmul_act forward gated", "matmul_act recompute dh gated",
                         "matmul_act split-K partials"}
    for row in rows.values():
        assert row["wgmma"] and row["tma"] and row["spill"] == 0, row
    for family in ("matmul_act forward", "matmul_act forward gated"):
        assert rows[family]["store"] == "-", rows[family]  # y and the preact leave through TMA stores
