"""The dispatch path's shortcuts keep its answers: the selection cache follows backend=,
use_backend and FUSEDFORMER_BACKEND, the eager path skips the autograd.Function only when no
gradient can flow, and outputs are contiguous on the custom-op path only."""

import sys

import fusedformer as ff
import pytest
import torch
from fusedformer import backends
from fusedformer._backends.tables import SOFTMAX

softmax_op = sys.modules["fusedformer.ops.softmax"]
_dispatch = sys.modules["fusedformer.ops._dispatch"]


def _spy_softmax_backends(monkeypatch):
    """Record which backend's softmax_forward runs each call (loaded implementations wrapped)."""
    ran = []
    for name in ("reference", "torch"):
        impl, _ = SOFTMAX.load(name)
        spied = SOFTMAX.check(type("module", (), {
            "softmax_forward": staticmethod(
                lambda x, dim, _f=impl.softmax_forward, _n=name: ran.append(_n) or _f(x, dim)),
            "softmax_backward": staticmethod(impl.softmax_backward)}))
        monkeypatch.setitem(SOFTMAX.loaded, name, (spied, None))
    return ran


def test_selection_follows_argument_context_and_environment(monkeypatch):
    ran = _spy_softmax_backends(monkeypatch)
    x = torch.randn(3, 5)
    ff.softmax(x)  # auto on a CPU: torch, now cached
    ff.softmax(x, backend="reference")
    with ff.use_backend("reference"):
        ff.softmax(x)
        ff.softmax(x, backend="torch")  # the argument wins over the context
    ff.softmax(x)
    monkeypatch.setenv("FUSEDFORMER_BACKEND", "reference")
    ff.softmax(x)
    with ff.use_backend("torch"):  # the context wins over the environment
        ff.softmax(x)
    monkeypatch.delenv("FUSEDFORMER_BACKEND")
    ff.softmax(x)
    assert ran == ["torch", "reference", "reference", "torch", "torch", "reference", "torch", "torch"]


def _count_asks(monkeypatch):
    asked = []
    real = backends.unsupported_reason
    monkeypatch.setattr(backends, "unsupported_reason", lambda *a: asked.append(a[0]) or real(*a))
    return asked


def test_selection_is_cached_per_features(monkeypatch):
    """A decision a backend's unsupported() takes part in is taken once per (family, requested,
    device, features); inputs it judges otherwise (here: dtype, head dim) get their own."""
    asked = _count_asks(monkeypatch)
    q = torch.randn(1, 2, 4, 8)
    args = lambda q: (q, q, q, None, False, 0.35, 0.0, None, (-1, -1), None)  # noqa: E731
    for _ in range(3):
        assert backends.select("attention", q.device, args(q)) == "torch"
    assert asked == ["torch"]
    backends.select("attention", q.device, args(q.double()))
    backends.select("attention", q.device, args(torch.randn(1, 2, 4, 16)))
    assert asked == ["torch"] * 3


def test_selection_for_any_arguments_is_taken_once(monkeypatch):
    """A backend that runs every input (no unsupported() of its own, first in auto's order) is
    chosen once per (family, requested, device), whatever the arguments; a backend with an
    unsupported() is asked again for other features."""
    asked = _count_asks(monkeypatch)
    x = torch.randn(3, 5)
    for t in (x, x.double(), torch.randn(2, 7, 4), x.requires_grad_()):
        assert backends.select("softmax", x.device, (t, 1)) == "torch"
    assert asked == ["torch"]
    impl, _ = SOFTMAX.load("torch")
    judging = SOFTMAX.check(type("module", (), {
        "softmax_forward": staticmethod(impl.softmax_forward), "softmax_backward": staticmethod(impl.softmax_backward),
        "unsupported": staticmethod(lambda x, dim: "no float64" if x.dtype == torch.float64 else None)}))
    monkeypatch.setitem(SOFTMAX.loaded, "torch", (judging, None))
    backends.clear_selection_cache()
    assert backends.select("softmax", x.device, (x, 1)) == "torch"
    assert backends.select("softmax", x.device, (x.double(), 1)) == "reference"
    assert backends.select("softmax", x.device, (x, 1)) == "torch"


def test_selection_cache_keeps_unsupported_inputs_apart(monkeypatch):
    """The same family on the same device, once with inputs torch cannot run (dropout) and once
    without: each call gets the backend its own inputs allow."""
    q = torch.randn(1, 2, 4, 8)
    args = lambda p: (q, q, q, None, False, 0.35, p, None, (-1, -1), None)  # noqa: E731
    assert backends.select("attention", q.device, args(0.0)) == "torch"
    assert backends.select("attention", q.device, args(0.5)) == "reference"
    assert backends.select("attention", q.device, args(0.0)) == "torch"
    with pytest.raises(backends.BackendUnavailableError, match="dropout"):
        backends.select("attention", q.device, args(0.5), "torch")
    with pytest.raises(backends.BackendUnavailableError, match="dropout"):  # failures are not cached away
        backends.select("attention", q.device, args(0.5), "torch")


def test_selection_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(backends, "_SELECTIONS_MAX", 4)
    x = torch.randn(3, 5)
    for eps in range(10):
        backends.select("layer_norm", x.device, (x, None, None, float(eps), None))
    assert 0 < len(backends._selections) <= 4


def test_no_grad_calls_skip_the_autograd_function(monkeypatch):
    """The body alone when nothing requires grad or grad mode is off; the Function (a grad_fn on
    the output, and a correct gradient) when a gradient can flow."""
    applied = []
    real = torch.autograd.Function.apply.__func__

    def spy(cls, *args):
        applied.append(cls.__name__)
        return real(cls, *args)

    monkeypatch.setattr(torch.autograd.Function, "apply", classmethod(spy))
    x = torch.randn(3, 5, dtype=torch.float64)
    assert ff.softmax(x).grad_fn is None
    with torch.no_grad():
        assert ff.softmax(x.requires_grad_()).grad_fn is None
    assert applied == []
    y = ff.softmax(x, 0)
    assert applied == ["Eager"] and y.grad_fn is not None
    torch.autograd.gradcheck(lambda t: ff.softmax(t, 0), (x,))


def test_custom_op_returns_contiguous_outputs_and_the_eager_body_does_not_copy():
    """torch's CPU flash kernel writes a transposed lse: the eager body passes it on as it is, the
    custom op (what graphs see, with contiguous fake outputs) makes it contiguous."""
    attention_op = sys.modules["fusedformer.ops.attention"]
    q = torch.randn(2, 3, 4, 8)
    args = (q, q, q, None, False, 0.35, 0.0, None, -1, -1, None, "torch")
    _, lse = attention_op.attention_fwd.body(*args)
    assert not lse.is_contiguous()
    out, lse = torch.ops.fusedformer.attention_fwd(*args)
    assert out.is_contiguous() and lse.is_contiguous()
    x = torch.randn(5, 4).t()
    assert torch.ops.fusedformer.softmax_fwd(x, 0, "reference").is_contiguous()


@pytest.mark.parametrize("call", [
    lambda x, meta: ff.layer_norm(x, (8,), meta(8)),
    lambda x, meta: ff.rms_norm(x, (8,), None, residual=meta(3, 8)),
    lambda x, meta: ff.linear_act(x, meta(4, 8)),
    lambda x, meta: ff.linear_act(x, torch.randn(4, 8), meta(4)),
])
def test_valid_call_shortcuts_still_check_devices(call):
    """The norms' and linear_act's shortcut for the common valid call tells a tensor on another
    device (here meta) apart, and the checks name it."""
    with pytest.raises(ValueError, match="is on meta but x is on cpu"):
        call(torch.randn(3, 8), lambda *shape: torch.randn(*shape, device="meta"))


class _AtenOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the aten ops that run (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.ran = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ran.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_backward_fills_no_zero_gradient_for_unused_outputs():
    """feed_forward's preact and hidden (M x d_ff each) and the norms' statistics are outputs of
    the autograd.Function nobody uses: no zero gradient is filled for them."""
    x = torch.randn(6, 8, requires_grad=True)
    w1, w2 = torch.randn(32, 8, requires_grad=True), torch.randn(8, 16, requires_grad=True)
    w = torch.randn(8, requires_grad=True)
    with _AtenOps() as ops:
        y = ff.feed_forward(x, w1, None, w2, None, "swiglu", backend="torch")
        y = ff.layer_norm(y, (8,), w, backend="torch")
        torch.autograd.grad(y.sum(), (x, w1, w2, w))
    assert not {"zeros", "zeros_like", "zero_", "fill_"} & set(ops.ran), ops.ran


@pytest.mark.parametrize("use_out", [False, True])
def test_norm_residual_stream_alone_gets_its_gradient(use_out):
    """With the normalized output unused (only the residual stream h = x + residual), the
    backward still gets a gradient for it (zeros) and the inputs theirs, as torch's."""
    x, r = (torch.randn(5, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    w = torch.randn(8, dtype=torch.float64, requires_grad=True)
    for norm, torch_norm in ((ff.layer_norm, torch.nn.functional.layer_norm),
                             (ff.rms_norm, torch.nn.functional.rms_norm)):
        out, h = norm(x, (8,), w, residual=r)
        loss = (h * h).sum() + (out.sum() if use_out else 0)
        got = torch.autograd.grad(loss, (x, r, w), allow_unused=True)
        h_ref = x + r
        loss_ref = (h_ref * h_ref).sum() + (torch_norm(h_ref, (8,), w).sum() if use_out else 0)
        expected = torch.autograd.grad(loss_ref, (x, r, w), allow_unused=True)
        for g, e in zip(got, expected):
            if e is None:
                assert g is None or not g.any()
            else:
                torch.testing.assert_close(g, e)


LEAN_CALLS = {
    "softmax": lambda t: ff.softmax(t["x"], -1),
    "layer_norm": lambda t: ff.layer_norm(t["x3"], (8,), t["w"], t["b"], 1e-3),
    "layer_norm_strided": lambda t: ff.layer_norm(t["xt"], (8,), t["w"], None, 1e-5),
    "layer_norm_residual": lambda t: ff.layer_norm(t["x3"], (8,), t["w"], t["b"], 1e-5, residual=t["r3"]),
    "rms_norm": lambda t: ff.rms_norm(t["x3"], (8,), t["w"]),
    "rms_norm_residual": lambda t: ff.rms_norm(t["x"], (8,), None, 1e-6, residual=t["r"]),
    "linear_act": lambda t: ff.linear_act(t["x3"], t["w1"], t["b1"], "gelu"),
    "linear_act_swiglu": lambda t: ff.linear_act(t["x"], t["w1"], None, "swiglu"),
    "feed_forward": lambda t: ff.feed_forward(t["x3"], t["w1"], t["b1"], t["w2"], None, "swiglu"),
    "attention": lambda t: ff.scaled_dot_product_attention(t["q"], t["k"], t["v"]),
    "attention_causal_gqa": lambda t: ff.scaled_dot_product_attention(t["q"], t["kg"], t["vg"], is_causal=True,
                                                                      scale=0.3, enable_gqa=True),
}


@pytest.mark.parametrize("name", sorted(LEAN_CALLS))
def test_lean_path_is_taken_and_gives_the_full_paths_answer(monkeypatch, name):
    """A no-grad eager call takes the lean path (no _mode: neither the custom op nor its body), and
    answers what the full path (the same call with grad mode on) answers, bit for bit."""
    g = torch.Generator().manual_seed(0)
    t = {k: torch.randn(*shape, generator=g, dtype=torch.float64) for k, shape in {
        "x": (5, 8), "x3": (2, 3, 8), "r": (5, 8), "r3": (2, 3, 8), "w": (8,), "b": (8,), "w1": (6, 8),
        "b1": (6,), "w2": (8, 3), "q": (2, 4, 5, 8), "k": (2, 4, 7, 8), "v": (2, 4, 7, 8), "kg": (2, 2, 3, 8),
        "vg": (2, 2, 3, 8)}.items()}
    t["xt"] = torch.randn(8, 5, generator=g, dtype=torch.float64).t()
    call = LEAN_CALLS[name]
    full = call(t)  # grad mode on: the full path, which also fills the selection cache
    modes = []
    real = _dispatch._mode
    monkeypatch.setattr(_dispatch, "_mode", lambda args: modes.append(1) or real(args))
    with torch.no_grad():
        lean = call(t)
    assert modes == []
    for got, expected in zip(*((r,) if isinstance(r, torch.Tensor) else r for r in (lean, full))):
        assert got.shape == expected.shape and torch.equal(got, expected)


REFUSED_CALLS = {
    "softmax_int": lambda: ff.softmax(torch.arange(6).reshape(2, 3)),
    "softmax_complex": lambda: ff.softmax(torch.randn(2, 3, dtype=torch.complex64)),
    "softmax_dim": lambda: ff.softmax(torch.randn(2, 3), 2),
    "layer_norm_int": lambda: ff.layer_norm(torch.arange(8).reshape(1, 8), (8,)),
    "layer_norm_weight_shape": lambda: ff.layer_norm(torch.randn(2, 8), (8,), torch.randn(7)),
    "layer_norm_weight_device": lambda: ff.layer_norm(torch.randn(2, 8), (8,), torch.randn(8, device="meta")),
    "layer_norm_shape": lambda: ff.layer_norm(torch.randn(2, 8), (4,)),
    "layer_norm_negative_eps": lambda: ff.layer_norm(torch.randn(2, 8), (8,), eps=-1.0),
    "layer_norm_weight_list": lambda: ff.layer_norm(torch.randn(2, 8), (8,), [1.0] * 8),
    "rms_norm_complex": lambda: ff.rms_norm(torch.randn(2, 8, dtype=torch.complex64), (8,)),
    "rms_norm_float8": lambda: ff.rms_norm(torch.randn(2, 8).to(torch.float8_e4m3fn), (8,)),
    "rms_norm_weight_dtype": lambda: ff.rms_norm(torch.randn(2, 8), (8,), torch.ones(8, dtype=torch.int32)),
    "rms_norm_negative_eps": lambda: ff.rms_norm(torch.randn(2, 8), (8,), eps=-1e-6),
    "attention_zero_kv_heads": lambda: ff.scaled_dot_product_attention(
        torch.randn(1, 2, 3, 4), *(torch.randn(1, 0, 3, 4),) * 2, enable_gqa=True),
    # the torch backend's kernel is a CPU one: its lean entry refuses another device itself
    "attention_torch_off_cpu": lambda: ff.scaled_dot_product_attention(
        *(torch.randn(1, 2, 3, 4, device="meta"),) * 3, backend="torch"),
}


@pytest.mark.parametrize("name", sorted(REFUSED_CALLS))
def test_lean_path_refusals_get_the_full_paths_error(name):
    """The lean entries run unchecked (torch's own checks): whatever they refuse, or compute where
    the op refuses, ends in the full path's error, the same with grad mode off as on."""
    call = REFUSED_CALLS[name]
    with pytest.raises((TypeError, ValueError, IndexError, RuntimeError)) as full:
        call()
    for backend in ("auto", "torch"):
        with torch.no_grad(), ff.use_backend(backend), pytest.raises(type(full.value)) as lean:
            call()
        assert str(lean.value) == str(full.value)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lean_norms_mix_low_precision_input_and_float32_weights_as_the_full_path(dtype):
    """torch's norms take a 16-bit x with float32 weights themselves; the lean path's answer is
    the full path's, bit for bit, in x's dtype."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 16, generator=g).to(dtype)
    w, b = torch.randn(16, generator=g), torch.randn(16, generator=g)
    for call in (lambda: ff.layer_norm(x, (16,), w, b), lambda: ff.rms_norm(x, (16,), w),
                 lambda: ff.rms_norm(x, (16,), w, 1e-3)):
        full = call()
        with torch.no_grad():
            lean = call()
        assert lean.dtype == dtype and torch.equal(lean, full)


def test_lean_path_only_on_backends_with_a_lean_entry(monkeypatch):
    """The reference (the oracle, never the fast path) has no lean entry: its no-grad calls take
    the full path; the torch backend's take its lean entry."""
    x = torch.randn(4, 8, dtype=torch.float64)
    modes = []
    real = _dispatch._mode
    monkeypatch.setattr(_dispatch, "_mode", lambda args: modes.append(1) or real(args))
    with torch.no_grad():
        ff.softmax(x, backend="reference")
        assert modes == [1]
        ff.softmax(x, backend="torch")
        assert modes == [1]
    assert backends.lean_choice("softmax", x, "reference") is None
    assert backends.lean_choice("softmax", x, "no-such-backend") is None
