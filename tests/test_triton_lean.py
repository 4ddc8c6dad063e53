"""The triton backend's lean entries (``<family>_lean`` in _backends/triton/): an eager no-grad call
on backend triton reaches the launcher without the full path (no _dispatch._mode), answers what
the full path answers bit for bit (values, dtype, shape, strides), and refuses, without launching
a kernel, every call the full path refuses or answers otherwise; the full path then gives its
own answer or error. On a CPU the kernels run interpreted (tests/conftest.py)."""

import types

import fusedformer as ff
import pytest
import torch
from fusedformer._backends.tables import FAMILIES

triton = pytest.importorskip("triton")

from fusedformer._backends.triton import _guards  # noqa: E402  (imports no triton, but runs only with it)
from fusedformer._backends.triton import attention as triton_attention  # noqa: E402
from fusedformer._backends.triton import linear_act as triton_linear_act  # noqa: E402
from fusedformer.kernels import (  # noqa: E402
    _device,  # noqa: E402
    bias_act,
    layer_norm,
    matmul_act,
    softmax,
)
from fusedformer.kernels import attention as attention_kernels  # noqa: E402
from fusedformer.ops import _dispatch  # noqa: E402

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# every launcher the triton backend's forwards call: (module, name)
LAUNCHERS = ((softmax, "softmax_fwd"), (layer_norm, "norm_fwd"), (matmul_act, "matmul_act_forward"),
             (bias_act, "bias_act_forward"), (attention_kernels, "run"))


class Sub(torch.Tensor):
    """A tensor subclass: the full path sends it through the custom op (and answers a Sub)."""



def _inputs(dtype):
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    return {
        "x3": randn(2, 3, 37), "x1": randn(37), "xt": randn(37, 6).t(), "xrows": randn(5, 50)[:, :37],
        "x4": randn(2, 3, 4, 5).permute(2, 0, 3, 1), "w": randn(37), "b": randn(37), "wstrided": randn(74)[::2],
        "w1": randn(20, 37), "b1": randn(20), "w2": randn(37, 10), "xk": randn(37, 5).t(),
        "q": randn(1, 4, 5, 16), "kg": randn(1, 2, 7, 16), "vg": randn(1, 2, 7, 16),
        "qt": randn(2, 5, 3, 16).transpose(1, 2), "kt": randn(2, 9, 3, 16).transpose(1, 2),
        "vt": randn(2, 9, 3, 16).transpose(1, 2), "qd": randn(2, 4, 1, 32), "kd": randn(2, 1, 40, 32),
        "vd": randn(2, 1, 40, 32),
    }


# name -> (family, call on _inputs' tensors)
LEAN_CALLS = {
    "softmax_3d": ("softmax", lambda t: ff.softmax(t["x3"], -1)),
    "softmax_strided_dim0": ("softmax", lambda t: ff.softmax(t["xt"], 0)),
    "softmax_permuted": ("softmax", lambda t: ff.softmax(t["x4"], 1)),  # a layout the backend copies
    "softmax_empty": ("softmax", lambda t: ff.softmax(t["x3"][:, :0], -2)),
    "layer_norm_3d": ("layer_norm", lambda t: ff.layer_norm(t["x3"], (37,), t["w"], t["b"], 1e-5)),
    "layer_norm_strided": ("layer_norm", lambda t: ff.layer_norm(t["xt"], 37, None, None, 1e-3)),
    "layer_norm_1d_strided_weight": ("layer_norm", lambda t: ff.layer_norm(t["x1"], (37,), t["wstrided"], None)),
    "rms_norm_default_eps": ("rms_norm", lambda t: ff.rms_norm(t["x3"], (37,), t["w"])),
    "rms_norm_row_stride": ("rms_norm", lambda t: ff.rms_norm(t["xrows"], (37,), None, 1e-6)),
    "linear_act_3d_gelu": ("linear_act", lambda t: ff.linear_act(t["x3"], t["w1"], t["b1"], "gelu")),
    "linear_act_strided_swiglu": ("linear_act", lambda t: ff.linear_act(t["xk"], t["w1"], None, "swiglu")),
    "linear_act_1d": ("linear_act", lambda t: ff.linear_act(t["x1"], t["w1"], t["b1"], "relu")),
    "feed_forward": ("linear_act", lambda t: ff.feed_forward(t["x3"], t["w1"], t["b1"], t["w2"], None, "swiglu")),
    "attention_causal_gqa": ("attention", lambda t: ff.scaled_dot_product_attention(
        t["q"], t["kg"], t["vg"], is_causal=True, enable_gqa=True)),
    "attention_strided_scale": ("attention", lambda t: ff.scaled_dot_product_attention(
        t["qt"], t["kt"], t["vt"], scale=0.3)),
    "attention_decode": ("attention", lambda t: ff.scaled_dot_product_attention(
        t["qd"], t["kd"], t["vd"], enable_gqa=True)),  # Lq = 1: the GQA-packed split-K path
}


def _assert_same(got, expected):
    assert type(got) is type(expected)
    if isinstance(expected, BaseException):
        assert str(got) == str(expected)
        return
    assert (got.dtype, got.shape, got.stride()) == (expected.dtype, expected.shape, expected.stride())
    assert torch.equal(got, expected)


def _outcome(call):
    """The call's answer, or the exception it raised."""
    try:
        return call()
    except Exception as exc:
        return exc


@pytest.fixture
def no_mode(monkeypatch):
    """Records each _dispatch._mode call: the full path asks it, the lean path never."""
    modes = []
    real = _dispatch._mode
    monkeypatch.setattr(_dispatch, "_mode", lambda args: modes.append(1) or real(args))
    return modes


@pytest.fixture
def launches(monkeypatch):
    """Records each launcher call (the name), then runs it."""
    calls = []
    for module, name in LAUNCHERS:
        real = getattr(module, name)
        monkeypatch.setattr(module, name,
                            lambda *a, _real=real, _name=name, **kw: calls.append(_name) or _real(*a, **kw))
    return calls


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(LEAN_CALLS))
def test_lean_entry_answers_as_the_full_path(name, dtype, no_mode, launches):
    family, call = LEAN_CALLS[name]
    t = _inputs(dtype)
    with ff.use_backend("triton"):
        full = call(t)  # grad mode on: the full path
        full_launches = list(launches)
        del no_mode[:], launches[:]
        with torch.no_grad():
            lean = call(t)
    assert no_mode == []
    assert launches == full_launches  # the same kernels (none for an empty input)
    _assert_same(lean, full)


def _bf16_before_sm80(module):
    """A call made as if on a GPU older than sm_80 (``module``'s view of it)."""
    return lambda monkeypatch: monkeypatch.setattr(module, "before_sm80", lambda t: True)


def _ln(x, shape=(8,), w=None, b=None):
    return lambda: ff.layer_norm(x, shape, w, b, 1e-5)


def _attention(d=16, dtype=torch.float32, **kw):
    q = torch.randn(1, 2, 3, d, dtype=dtype)
    return lambda: ff.scaled_dot_product_attention(q, q, q, **kw)


# name -> (family, call, setup(monkeypatch) or None): calls that reach the triton lean entry, which
# must refuse them without a launch; the full path then answers or raises as with grad mode on
REFUSED_CALLS = {
    "softmax_int": ("softmax", lambda: ff.softmax(torch.arange(6).reshape(2, 3)), None),
    "softmax_complex": ("softmax", lambda: ff.softmax(torch.randn(2, 3, dtype=torch.complex64)), None),
    "softmax_float64": ("softmax", lambda: ff.softmax(torch.randn(2, 3, dtype=torch.float64)), None),
    "softmax_dim": ("softmax", lambda: ff.softmax(torch.randn(2, 3), 2), None),
    "softmax_dim_empty": ("softmax", lambda: ff.softmax(torch.randn(0, 3), -3), None),
    "softmax_0d": ("softmax", lambda: ff.softmax(torch.tensor(1.5), 0), None),
    "layer_norm_int": ("layer_norm", _ln(torch.arange(8).reshape(1, 8)), None),
    "layer_norm_float64": ("layer_norm", _ln(torch.randn(2, 8, dtype=torch.float64)), None),
    "layer_norm_shape": ("layer_norm", _ln(torch.randn(2, 8), (4,)), None),
    "layer_norm_shape_float": ("layer_norm", _ln(torch.randn(2, 8), (8.0,)), None),
    "layer_norm_shape_list": ("layer_norm", _ln(torch.randn(2, 3, 8), [3, 8]), None),
    "layer_norm_0d": ("layer_norm", _ln(torch.tensor(1.5), ()), None),
    "layer_norm_empty_rows": ("layer_norm", _ln(torch.randn(0, 8)), None),
    "layer_norm_empty_row": ("layer_norm", _ln(torch.randn(3, 0), (0,)), None),
    "layer_norm_weight_shape": ("layer_norm", _ln(torch.randn(2, 8), w=torch.randn(7)), None),
    "layer_norm_weight_device": ("layer_norm", _ln(torch.randn(2, 8), w=torch.randn(8, device="meta")), None),
    "layer_norm_weight_int": ("layer_norm", _ln(torch.randn(2, 8), w=torch.ones(8, dtype=torch.int32)), None),
    "layer_norm_weight_list": ("layer_norm", _ln(torch.randn(2, 8), w=[1.0] * 8), None),
    "layer_norm_weight_float16": ("layer_norm", _ln(torch.randn(2, 8), w=torch.randn(8).half()), None),
    "layer_norm_bias_subclass": ("layer_norm", _ln(torch.randn(2, 8), b=torch.randn(8).as_subclass(Sub)), None),
    "rms_norm_complex": ("rms_norm", lambda: ff.rms_norm(torch.randn(2, 8, dtype=torch.complex64), (8,)), None),
    "rms_norm_float8": ("rms_norm", lambda: ff.rms_norm(torch.randn(2, 8).to(torch.float8_e4m3fn), (8,)), None),
    "rms_norm_weight_float32": ("rms_norm", lambda: ff.rms_norm(torch.randn(2, 8).bfloat16(), (8,),
                                                                torch.randn(8)), None),
    "linear_act_weight_subclass": ("linear_act", lambda: ff.linear_act(
        torch.randn(2, 8), torch.randn(6, 8).as_subclass(Sub), None, "gelu"), None),
    "linear_act_bias_subclass": ("linear_act", lambda: ff.linear_act(
        torch.randn(2, 8), torch.randn(6, 8), torch.randn(6).as_subclass(Sub), "gelu"), None),
    "linear_act_bf16_before_sm80": ("linear_act", lambda: ff.linear_act(
        torch.randn(2, 8).bfloat16(), torch.randn(6, 8).bfloat16(), None, "gelu"),
        _bf16_before_sm80(triton_linear_act)),
    "feed_forward_w2_subclass": ("linear_act", lambda: ff.feed_forward(
        torch.randn(2, 8), torch.randn(6, 8), None, torch.randn(4, 6).as_subclass(Sub), None, "gelu"), None),
    "attention_float64": ("attention", _attention(dtype=torch.float64), None),
    "attention_head_dim": ("attention", _attention(d=triton_attention.MAX_HEAD_DIM + 16), None),
    "attention_bf16_before_sm80": ("attention", _attention(dtype=torch.bfloat16),
                                   _bf16_before_sm80(triton_attention)),
}


@pytest.mark.parametrize("name", sorted(REFUSED_CALLS))
def test_lean_entry_refuses_without_launching(name, monkeypatch, launches):
    """The entry is reached, raises and launches nothing; the call then ends as with grad on:
    the same error (type and message) or the same answer (empty inputs, mixed dtypes, subclasses)."""
    family, call, setup = REFUSED_CALLS[name]
    if setup:
        setup(monkeypatch)
    impl, _ = FAMILIES[family].load("triton")
    entry = getattr(impl, f"{family}_lean")
    seen = []

    def spy(*args):
        before = len(launches)
        outcome = _outcome(lambda: entry(*args))
        seen.append((isinstance(outcome, Exception), launches[before:]))
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    monkeypatch.setattr(impl, f"{family}_lean", spy)
    with ff.use_backend("triton"):
        torch.manual_seed(0)  # the calls draw their inputs: the same ones twice
        full = _outcome(call)
        torch.manual_seed(0)
        with torch.no_grad():
            lean = _outcome(call)
    # refused, and without a launch (feed_forward's first GEMM, a valid call, may answer; 0-D
    # softmax's full path calls the op again on a 1-D view)
    assert any(refused for refused, _ in seen) and not any(launched for refused, launched in seen if refused), seen
    _assert_same(lean, full)


def test_zero_kv_heads_with_gqa_get_the_full_paths_error():
    """ops/attention's lean test of the heads divides by the kv heads only when there are some."""
    q, k = torch.randn(1, 2, 3, 4), torch.randn(1, 0, 3, 4)
    for backend in ("torch", "triton"):
        with pytest.raises(ValueError, match="multiple of key heads") as full:
            ff.scaled_dot_product_attention(q, k, k, enable_gqa=True, backend=backend)
        with torch.no_grad(), pytest.raises(ValueError) as lean:
            ff.scaled_dot_product_attention(q, k, k, enable_gqa=True, backend=backend)
        assert str(lean.value) == str(full.value)


@pytest.mark.parametrize("path", ["gemm", "epilogue"])
def test_lean_linear_act_takes_the_path_the_variable_names(path, monkeypatch, launches):
    """FUSEDFORMER_LINEAR_ACT_PATH is read on every call, the lean one too."""
    monkeypatch.setenv("FUSEDFORMER_LINEAR_ACT_PATH", path)
    x, w = torch.randn(3, 8).half(), torch.randn(6, 8).half()
    with torch.no_grad():
        ff.linear_act(x, w, None, "silu", backend="triton")
    assert launches == (["matmul_act_forward"] if path == "gemm" else ["bias_act_forward"])


def test_capability_is_asked_once_per_gpu(monkeypatch):
    """before_sm80 asks torch for a GPU's properties once (kernels/_device.py), and answers from them."""
    asked = []
    monkeypatch.setattr(_device, "_properties", {})
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: asked.append(i) or types.SimpleNamespace(major=7 if i else 9))

    class OnGpu:
        is_cuda = True

        def __init__(self, index):
            self.device = torch.device("cuda", index)

    assert [_guards.before_sm80(OnGpu(i)) for i in (0, 1, 0, 1)] == [False, True, False, True]
    assert asked == [0, 1]
    assert not _guards.before_sm80(torch.randn(2))
