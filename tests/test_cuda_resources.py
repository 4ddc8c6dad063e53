"""The CUDA kernels' resources against their largest launches, checked on a CPU: what ptxas gave
each kernel of the built fusedformer._C for sm_80 and sm_90a (registers per thread, static shared
memory, stack; read by cuobjdump -res-usage) paired with the largest launch its launcher can make
(_C.launch_limits(): block size, dynamic shared memory, opt-in). A launch beyond the registers or
the shared memory of a block fails on the GPU at once; here it fails before one is needed."""

import re

import pytest
from _cuda_build import NVCC, ROOT, build_extension, current_in_place_extension, find_cuobjdump, resource_usage

# per block, from the CUDA C++ Programming Guide's table of compute capabilities
ARCH_LIMITS = {
    "sm_80": {"registers": 65536, "optin_smem": 163 * 1024},
    "sm_90a": {"registers": 65536, "optin_smem": 227 * 1024},
}
REGISTER_UNIT = 256  # registers are given to a warp in 256s (8 per thread)
# Stack (local memory: spills included) a kernel may use; every other kernel uses none.
# attn_bwd_kernel keeps dK, dV and dS tiles at 255 registers and spills a few words.
STACK_BYTES = {"attn_bwd_kernel": 32}
MIN_ROW_CACHE = 32 * 1024  # a row cache smaller than this would be a regression: N = 4096 fp32 backward


@pytest.fixture(scope="module")
def built():
    """(_C, {arch: {kernel symbol: usage}}): the in-place _C when it is current for both archs,
    else one built into build/ (minutes, once; ninja keeps later builds incremental)."""
    if NVCC is None:
        pytest.skip("nvcc not found: fusedformer._C cannot be built here")
    cuobjdump = find_cuobjdump()
    if cuobjdump is None:
        pytest.skip("cuobjdump not found (CUDA toolkit, PATH, or the triton wheel)")
    ext = current_in_place_extension(ARCH_LIMITS) or build_extension(
        ";".join(a.removeprefix("sm_") for a in ARCH_LIMITS), ROOT / "build" / "test_cuda_resources")
    return ext, resource_usage(cuobjdump, ext.__file__)


def _limit_of(symbol, limits):
    """The launch_limits() entry of a mangled kernel symbol: its name as a length-prefixed
    identifier, then its template arguments (I...) or its parameters (E...); head_dim from Li<D>E."""
    found = [entry for entry in limits
             if re.search(f"{len(entry['kernel'])}{entry['kernel']}[IE]", symbol)
             and (entry["head_dim"] == 0 or f"Li{entry['head_dim']}E" in symbol)]
    assert len(found) == 1, f"{symbol}: {len(found)} launch_limits() entries match, expected 1"
    return found[0]


def _kernels(built, arch):
    ext, usage = built
    assert arch in usage, f"_C has no {arch} code (built for {ext.BUILT_ARCHS})"
    limits = ext.launch_limits()
    return [(symbol, res, _limit_of(symbol, limits)) for symbol, res in sorted(usage[arch].items())]


def _max_dynamic_smem(ext, limit, res, arch):
    if limit["max_dynamic_smem"] is None:  # a row cache: what the device's opt-in limit leaves
        return ext.row_cache_bytes(ARCH_LIMITS[arch]["optin_smem"], res["SHARED"])
    return limit["max_dynamic_smem"]


@pytest.mark.parametrize("arch", ARCH_LIMITS)
def test_every_kernel_has_a_launch_limit(built, arch):
    kernels = _kernels(built, arch)
    named = {limit["kernel"] for _, _, limit in kernels}
    assert named == {limit["kernel"] for limit in built[0].launch_limits()}, "launch_limits() lists a kernel not built"


@pytest.mark.parametrize("arch", ARCH_LIMITS)
def test_registers_fit_the_largest_block(built, arch):
    too_many = []
    for symbol, res, limit in _kernels(built, arch):
        per_warp = -(-res["REG"] * 32 // REGISTER_UNIT) * REGISTER_UNIT
        need = per_warp * -(-limit["max_threads"] // 32)
        if need > ARCH_LIMITS[arch]["registers"]:
            too_many.append(f"{symbol}: {res['REG']} registers x {limit['max_threads']} threads = {need}")
    assert not too_many, f"launches that fail for registers on {arch}:\n" + "\n".join(too_many)


@pytest.mark.parametrize("arch", ARCH_LIMITS)
def test_shared_memory_fits_what_each_launcher_allows(built, arch):
    ext = built[0]
    too_much = []
    for symbol, res, limit in _kernels(built, arch):
        dynamic = _max_dynamic_smem(ext, limit, res, arch)
        allowed = ARCH_LIMITS[arch]["optin_smem"] if limit["opt_in"] else ext.DEFAULT_SMEM_BYTES
        if res["SHARED"] + dynamic > allowed:
            too_much.append(f"{symbol}: {res['SHARED']} static + {dynamic} dynamic > {allowed} bytes"
                            f"{'' if limit['opt_in'] else ' (no opt-in)'}")
        if limit["max_dynamic_smem"] is None and dynamic < MIN_ROW_CACHE:
            too_much.append(f"{symbol}: a row cache of only {dynamic} bytes next to {res['SHARED']} static")
    assert not too_much, f"shared memory on {arch}:\n" + "\n".join(too_much)


@pytest.mark.parametrize("arch", ARCH_LIMITS)
def test_no_stack_or_spills_beyond_the_allowance(built, arch):
    over = [f"{symbol}: {res['STACK']} bytes of stack, {res['LOCAL']} of local memory"
            for symbol, res, limit in _kernels(built, arch)
            if res["STACK"] > STACK_BYTES.get(limit["kernel"], 0) or res["LOCAL"]]
    assert not over, f"local memory (spills) on {arch}:\n" + "\n".join(over)


def test_row_cache_leaves_room_for_static_shared_memory(built):
    ext = built[0]
    assert ext.row_cache_bytes(163 * 1024, 1152) == 163 * 1024 - 1152
    assert ext.row_cache_bytes(48 * 1024, 1160) % 16 == 0 and ext.row_cache_bytes(48 * 1024, 1160) <= 48 * 1024 - 1160
    assert ext.row_cache_bytes(1024, 2048) == 0
