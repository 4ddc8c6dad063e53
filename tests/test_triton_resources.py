"""Every configuration autotune (or a launch heuristic) may select, compiled for sm_90a and sm_80
without a GPU, fits the target's shared memory per block and, for 16-bit inputs, keeps every value
in registers (no spill stores). A config that fails here fails its launch on the GPU (too much
shared memory) or runs from local memory (spills).

The configurations and specialisations are listed in triton_resource_jobs.py (read from the
kernels' autotuners and heuristics); triton_sm90_compile.py --resources compiles them in
subprocesses without the interpreter, once per session, sharded over the CPUs.
"""

import json
import os
import subprocess
import sys

import pytest
import triton

HERE = os.path.dirname(os.path.abspath(__file__))
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
# shared memory per block a kernel may opt in to (cudaDevAttrMaxSharedMemoryPerBlockOptin):
# H100 227 KB, A100 163 KB
SHARED_PER_BLOCK = {90: 227 * 1024, 80: 163 * 1024}
FAMILIES = ("attention_fwd", "attention_bwd", "attention_decode", "matmul_act", "bias_act", "rows")

pytestmark = pytest.mark.skipif(not os.path.exists(PTXAS), reason="triton's bundled ptxas is missing")


def compile_reports(cache_dir, plant=False):
    """Run every resource compile job (or only the planted one) and return its JSON rows."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    shards = max(1, min(4, os.cpu_count() or 1))
    procs = []
    for shard in range(shards):
        # a fresh cache per run: a cached kernel skips ptxas, whose report gives registers and spills
        env_shard = dict(env, TRITON_CACHE_DIR=os.path.join(cache_dir, str(shard)))
        cmd = [sys.executable, os.path.join(HERE, "triton_sm90_compile.py"), "--resources", str(shard), str(shards)]
        procs.append(subprocess.Popen(cmd + (["--plant"] if plant else []), env=env_shard, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    rows = []
    for proc in procs:
        out, err = proc.communicate(timeout=1200)
        assert proc.returncode == 0, err[-3000:]
        rows += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return rows


def label(row):
    """A row's kernel, target and config in a few words: '_attn_fwd_kernel sm_90 128x64 w8 s3'."""
    c = row["config"]
    blocks = "x".join(str(v) for k, v in c.items() if k.startswith("BLOCK_"))
    stages = f" s{c['num_stages']}" if c.get("num_stages") else ""
    split = " split" if c.get("SPLIT_DKDV") else ""  # attention dK/dV in two passes
    return f"{row['kernel']} sm_{row['arch']} {blocks} w{c['num_warps']}{stages}{split}"


def violations(rows):
    """(label, what) of each row over its target's shared memory, or spilling with 16-bit inputs."""
    bad = []
    for r in rows:
        if r["shared"] > SHARED_PER_BLOCK[r["arch"]]:
            bad.append((label(r), f"{r['shared']} bytes of shared memory > {SHARED_PER_BLOCK[r['arch']]}"))
        if r["sixteen_bit"] and r["spill"]:
            bad.append((label(r), f"spills {r['spill']} bytes per thread ({r['regs']} registers)"))
    return bad


# Spilling configs found by this test when it landed (triton 3.6.0's ptxas), each still selectable.
# The autotune lists and prune rules of kernels/ must drop them (issue 15); until then they are
# the only violations tolerated, and an entry that no longer spills must be removed from here.
KNOWN_SPILLS = {
    # attention (labels: BLOCK_M x BLOCK_N x BLOCK_D): the forward's 2-stage 128x128 tile at D = 128
    # on sm_80 only (sm_90a takes K/V through TMA, no spill); no backward tile spills since issue 18
    "_attn_fwd_kernel sm_80 128x128x128 w8 s2",
}


@pytest.fixture(scope="session")
def reports(tmp_path_factory):
    return compile_reports(str(tmp_path_factory.mktemp("triton_resources")))


@pytest.mark.parametrize("arch", sorted(SHARED_PER_BLOCK))
@pytest.mark.parametrize("family", FAMILIES)
def test_every_selectable_config_fits(reports, family, arch):
    rows = [r for r in reports if r["family"] == family and r["arch"] == arch]
    assert rows, f"no {family} configuration compiled for sm_{arch}"
    bad = violations(rows)
    new = [f"{where}: {what}" for where, what in bad if where not in KNOWN_SPILLS or "spills" not in what]
    assert not new, "\n".join(new)
    spilling = {where for where, what in bad if "spills" in what}
    stale = {label(r) for r in rows} & KNOWN_SPILLS - spilling
    assert not stale, f"no longer spilling, remove from KNOWN_SPILLS: {sorted(stale)}"


def test_planted_oversize_config_is_caught(tmp_path):
    """A GEMM config added to the autotuner's list (4 stages of 64x256 bf16 tiles) is compiled and
    rejected for its shared memory on both targets."""
    rows = compile_reports(str(tmp_path), plant=True)
    assert sorted(r["arch"] for r in rows) == sorted(SHARED_PER_BLOCK)
    assert all(any("shared memory" in what for _, what in violations([r])) for r in rows), rows
