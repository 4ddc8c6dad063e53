"""The CUDA extension on a machine without a GPU: csrc/ compiles with nvcc, fusedformer._C imports,
exports every launcher the cuda backend modules need, maps C++ errors to Python exceptions, and
the cuda backend's Python-side checks (unsupported(), alignment, mask strides) behave."""

import importlib
import importlib.util

import _cuda_build
import pytest
import torch
from _cuda_build import NVCC, ROOT, build_extension
from fusedformer import backends

CUDA_MODULES = ("softmax", "layer_norm", "rms_norm", "linear_act", "attention")
# build/ is git-ignored; ninja makes rebuilds after the first one incremental
BUILD_DIR = ROOT / "build" / "test_cuda_build"

needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (CUDA_HOME, PATH, /usr/local/cuda): "
                                                     "the CUDA extension cannot be built here")


def _cuda_module(family):
    return importlib.import_module(f"fusedformer._backends.cuda.{family}")


@pytest.fixture(scope="module")
def built_extension():
    """fusedformer._C built from this checkout's csrc/ (one arch, to stay quick)."""
    return build_extension("80", BUILD_DIR)


@needs_nvcc
def test_csrc_builds_and_imports_without_gpu(built_extension):
    assert built_extension.DTYPE_FLOAT32 == 0 and built_extension.DTYPE_BFLOAT16 == 2


@needs_nvcc
@pytest.mark.parametrize("family", CUDA_MODULES)
def test_every_claimed_launcher_is_exported(built_extension, family):
    module = _cuda_module(family)
    missing = [name for name in module.REQUIRED_SYMBOLS if not hasattr(built_extension, name)]
    assert not missing, f"{family}: _C lacks {missing}"


@needs_nvcc
def test_head_dims_agree_with_the_build(built_extension):
    assert tuple(built_extension.ATTENTION_HEAD_DIMS) == _cuda_module("attention").HEAD_DIMS


@needs_nvcc
def test_bad_launch_arguments_raise_value_error(built_extension):
    with pytest.raises(ValueError, match="negative size"):
        built_extension.softmax_forward(0, 0, 0, -1, 4, 4, 4, False, 0)
    with pytest.raises(ValueError, match="dtype code"):
        built_extension.softmax_forward(7, 16, 16, 2, 4, 4, 4, False, 0)
    with pytest.raises(ValueError, match="head_dim"):
        built_extension.attention_forward(1, 40, 16, 16, 16, [0] * 9, 16, 16, 1, 1, 1, 1, 1, 1.0, False, 0, 0,
                                          [0] * 4, 0)
    with pytest.raises(ValueError, match="bias"):
        built_extension.attention_forward(1, 64, 16, 16, 16, [0] * 9, 16, 16, 1, 1, 1, 1, 1, 1.0, False, 3, 16,
                                          [0] * 4, 0)
    with pytest.raises(ValueError, match="activation"):
        built_extension.bias_act_forward(1, 16, 0, 16, 1, 8, 8, 8, 99, False, 0)


@needs_nvcc
def test_empty_launch_is_a_no_op(built_extension):
    # nothing to do: returns before touching the (absent) GPU
    built_extension.softmax_forward(0, 0, 0, 0, 5, 5, 5, False, 0)
    built_extension.layer_norm_forward(0, 0, 0, 0, 0, 0, 0, 16, 16, 5, 0, 0, 0, 0, 0, 1e-5, False, 0)


@needs_nvcc
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error path of a machine without a GPU")
def test_cuda_errors_become_runtime_errors(built_extension):
    with pytest.raises(RuntimeError, match="cudaSetDevice"):
        built_extension.set_device(0)


def test_in_tree_extension_matches_the_modules():
    """When this checkout has an in-place build, it exports what the modules claim."""
    ext = backends.cuda_extension()
    if ext is None:
        pytest.skip("no in-place fusedformer._C (build with `python setup.py build_ext --inplace`)")
    for family in CUDA_MODULES:
        missing = [name for name in _cuda_module(family).REQUIRED_SYMBOLS if not hasattr(ext, name)]
        assert not missing, f"stale in-place _C: {family} needs {missing}"


# --------------------------------------------------------------------------------------------
# the Python side of the cuda backend (no GPU needed)
# --------------------------------------------------------------------------------------------


def _qkv(dtype=torch.float16, D=64, Dv=None, H=2, Hkv=2, L=9):
    q = torch.randn(1, H, L, D).to(dtype)
    k = torch.randn(1, Hkv, L, D).to(dtype)
    v = torch.randn(1, Hkv, L, Dv or D).to(dtype)
    return q, k, v


def _attn_args(q, k, v, bias=None, causal=False, dropout_p=0.0, window=(-1, -1), alibi=None):
    return (q, k, v, bias, causal, 0.125, dropout_p, None, window, alibi)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 128])
def test_attention_supported_inputs(dtype, D):
    attn = _cuda_module("attention")
    q, k, v = _qkv(dtype, D, H=4, Hkv=2)
    assert attn.unsupported(*_attn_args(q, k, v)) is None
    assert attn.unsupported(*_attn_args(q, k, v, causal=True)) is None
    assert attn.unsupported(*_attn_args(q, k, v, bias=torch.ones(1, 1, 1, 9, dtype=torch.bool))) is None
    assert attn.unsupported(*_attn_args(q, k, v, bias=torch.randn(1, 4, 9, 9))) is None


@pytest.mark.parametrize("change,words", [
    (dict(dtype=torch.float32), "float16, bfloat16"),
    (dict(dtype=torch.float64), "float16, bfloat16"),
    (dict(D=40), "head dim 40"),
    (dict(D=96), "head dim 96"),
    (dict(Dv=128), "value dim 128"),
])
def test_attention_unsupported_shapes_and_dtypes(change, words):
    q, k, v = _qkv(**change)
    reason = _cuda_module("attention").unsupported(*_attn_args(q, k, v))
    assert reason is not None and words in reason


@pytest.mark.parametrize("kwargs,words", [
    (dict(dropout_p=0.1), "dropout"),
    (dict(window=(4, 0)), "sliding-window"),
    (dict(alibi=torch.ones(2)), "ALiBi"),
])
def test_attention_unsupported_features(kwargs, words):
    q, k, v = _qkv()
    assert words in _cuda_module("attention").unsupported(*_attn_args(q, k, v, **kwargs))


def test_attention_float_mask_gradient_is_declined():
    q, k, v = _qkv()
    bias = torch.randn(1, 2, 9, 9, requires_grad=True)
    assert "gradient" in _cuda_module("attention").unsupported(*_attn_args(q, k, v, bias=bias))
    assert _cuda_module("attention").unsupported(*_attn_args(q, k, v, bias=bias.detach())) is None


def test_attention_mask_strides_broadcast():
    attn = _cuda_module("attention")
    kind, t, strides = attn._bias_args(torch.ones(2, 1, 1, 9, dtype=torch.bool), 2, 3, 5, 9)
    assert kind == 1 and t.dtype == torch.uint8 and strides == [9, 0, 0, 1]
    kind, t, strides = attn._bias_args(torch.randn(1, 3, 5, 9, dtype=torch.float16), 2, 3, 5, 9)
    assert kind == 2 and t.dtype == torch.float32 and strides == [0, 45, 9, 1]
    assert attn._bias_args(None, 2, 3, 5, 9)[0] == 0


@pytest.mark.parametrize("family,args", [
    ("softmax", lambda x: (x, 1)),
    ("layer_norm", lambda x: (x, None, None, 1e-5, None)),
    ("rms_norm", lambda x: (x, None, 1e-6, None)),
    ("linear_act", lambda x: (x, torch.randn(6, 5, dtype=x.dtype), None, "gelu")),
])
def test_memory_bound_dtypes(family, args):
    module = _cuda_module(family)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert module.unsupported(*args(torch.randn(3, 5).to(dtype))) is None
    assert "float64" in module.unsupported(*args(torch.randn(3, 5, dtype=torch.float64)))


@pytest.mark.parametrize("family,args", [
    ("layer_norm", lambda x, r: (x, None, None, 1e-5, r)),
    ("rms_norm", lambda x, r: (x, None, 1e-6, r)),
])
def test_norm_residual_dtype_must_match(family, args):
    x = torch.randn(3, 8, dtype=torch.float16)
    module = _cuda_module(family)
    assert module.unsupported(*args(x, x.clone())) is None
    assert "residual" in module.unsupported(*args(x, x.float()))


def test_linear_act_unknown_activation():
    x = torch.randn(3, 5)
    assert "activation" in _cuda_module("linear_act").unsupported(x, torch.randn(6, 5), None, "mish")


def test_row_alignment_decides_vector_access():
    common = importlib.import_module("fusedformer._backends.cuda._common")
    base = torch.empty(64, 40, dtype=torch.float16)
    assert common.rows_aligned(base)  # 80-byte rows, 16-byte aligned start
    assert not common.rows_aligned(base[:, 1:])  # start shifted by 2 bytes
    assert not common.rows_aligned(torch.empty(64, 41, dtype=torch.float16))  # 82-byte rows
    assert common.rows_aligned(torch.empty(1, 41, dtype=torch.float16))  # one row: only its start counts
    assert common.rows_aligned(base, None)


def test_dense_aligned_copies_only_when_needed():
    common = importlib.import_module("fusedformer._backends.cuda._common")
    t = torch.randn(2, 3, 17, 64).to(torch.float16)
    assert common.dense_aligned(t) is t
    shifted = torch.randn(2 * 3 * 17 * 64 + 1).to(torch.float16)[1:].view(2, 3, 17, 64)
    fixed = common.dense_aligned(shifted)
    assert fixed.data_ptr() % 16 == 0 and torch.equal(fixed, shifted)
    transposed = torch.randn(2, 17, 3, 64).to(torch.float16).transpose(1, 2)  # (B, H, L, D) view of (B, L, H, D)
    assert common.dense_aligned(transposed) is transposed  # strides are multiples of 16 bytes
    odd = torch.randn(2, 3, 17, 65).to(torch.float16)[..., :64]  # 130-byte rows
    assert common.dense_aligned(odd).is_contiguous()


def test_cuda_backend_refuses_cpu_tensors():
    x = torch.randn(4, 8)
    reason = backends.unsupported_reason("cuda", "softmax", x.device, (x, 1))
    assert reason is not None
    with pytest.raises(backends.BackendUnavailableError):
        backends.select("softmax", x.device, (x, 1), "cuda")


def test_sanitize_script_is_importable():
    spec = importlib.util.spec_from_file_location("sanitize_cuda", ROOT / "benchmarks" / "sanitize_cuda.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert set(module.CASES) >= {"softmax", "layer_norm", "rms_norm", "linear_act", "attention"}


# --------------------------------------------------------------------------------------------
# availability: _C's probe of the driver and the GPU (a fake probe result, no GPU needed)
# --------------------------------------------------------------------------------------------

BUILT = ("sm_80", "sm_90a", "compute_90")


class _FakeExtension:
    """A built _C whose probe reports ``info`` for every device."""

    BUILT_ARCHS = BUILT

    def __init__(self, **info):
        self.info = {"driver_version": 13000, "runtime_version": 13000, "capability": (9, 0), **info}

    def probe(self, device):
        return {k: v for k, v in self.info.items() if v is not None}


@pytest.fixture
def fake_gpu(monkeypatch):
    """Install a fake _C (returned by the fixture's setter) on a machine that claims a GPU."""
    common = importlib.import_module("fusedformer._backends.cuda._common")
    monkeypatch.setattr(common, "_runtime_reasons", {})
    monkeypatch.setattr(backends, "_cuda_extension_error", lambda: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def install(**info):
        monkeypatch.setattr(backends, "cuda_extension", lambda: _FakeExtension(**info))
        return backends.unavailable_reason("cuda", torch.device("cuda", 0))

    return install


def test_probe_of_a_stale_extension_is_a_reason(monkeypatch):
    common = importlib.import_module("fusedformer._backends.cuda._common")
    monkeypatch.setattr(common, "_runtime_reasons", {})
    monkeypatch.setattr(backends, "cuda_extension", lambda: object())
    assert "stale" in common.runtime_reason(0) and "probe" in common.runtime_reason(0)


def test_probe_accepts_a_matching_driver_and_gpu(fake_gpu):
    assert fake_gpu() is None
    assert fake_gpu(capability=(8, 6)) is None  # sm_80 code runs on every 8.x
    assert fake_gpu(capability=(10, 0)) is None  # the compute_90 PTX is compiled by the driver
    assert fake_gpu(driver_version=13020) is None


@pytest.mark.parametrize("info,words", [
    (dict(driver_version=12080), ["CUDA 12.8", "CUDA 13.0 runtime", "R580"]),
    (dict(driver_version=0), ["no NVIDIA driver"]),
    (dict(capability=(7, 5)), ["sm_80, sm_90a, compute_90", "sm_75", "FUSEDFORMER_CUDA_ARCHS=75"]),
    (dict(capability=None, error="cudaErrorNoDevice: no CUDA-capable device is detected"), ["cudaErrorNoDevice"]),
])
def test_probe_explains_why_the_backend_cannot_run(fake_gpu, info, words):
    reason = fake_gpu(**info)
    assert reason is not None and all(w in reason for w in words), reason


def test_probe_reason_reaches_named_and_auto_selection(fake_gpu, monkeypatch):
    assert "R580" in fake_gpu(driver_version=12080)
    x = torch.randn(4, 8)
    with pytest.raises(backends.BackendUnavailableError, match="R580"):
        backends.select("softmax", torch.device("cuda", 0), (x, 1), "cuda")
    monkeypatch.setitem(backends.AUTO_ORDER, "cuda", ("cuda", "reference"))  # cuda first: auto must skip it
    assert backends.select("softmax", torch.device("cuda", 0), (x, 1)) == "reference"
    assert "cuda" not in backends.available_backends("cuda:0")


def test_sm90a_code_runs_only_on_sm90():
    common = importlib.import_module("fusedformer._backends.cuda._common")
    assert common.runs_on(("sm_90a",), (9, 0)) and not common.runs_on(("sm_90a",), (10, 0))
    assert not common.runs_on(("sm_100a",), (10, 3)) and common.runs_on(("sm_100f",), (10, 3))
    assert common.runs_on(("sm_80",), (8, 9)) and not common.runs_on(("sm_80",), (9, 0))
    assert common.runs_on(("compute_80",), (12, 0)) and not common.runs_on(("compute_90",), (8, 9))


def test_build_targets_add_ptx_of_the_newest_arch(monkeypatch):
    setup = _cuda_build.setup_module()
    monkeypatch.setenv("FUSEDFORMER_CUDA_ARCHS", "80;90a")
    assert setup.cuda_targets() == ["sm_80", "sm_90a", "compute_90"]
    assert "-gencode=arch=compute_90,code=compute_90" in setup.gencode_flags(setup.cuda_targets())
    monkeypatch.setenv("FUSEDFORMER_CUDA_ARCHS", "sm_86,80")
    assert setup.cuda_targets() == ["sm_86", "sm_80", "compute_86"]


@needs_nvcc
def test_built_archs_are_recorded(built_extension):
    assert built_extension.BUILT_ARCHS == ("sm_80", "compute_80")
