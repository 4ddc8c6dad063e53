"""ff.feed_forward: parity of output and all five gradients against the float64 reference on the
reference and triton backends, recompute=True against recompute=False, what the backward keeps,
opcheck on fusedformer::feed_forward_fwd / _bwd, and torch.compile(fullgraph=True)."""

import fusedformer as ff
import pytest
import torch
import torch.nn.functional as F
from _testing import assert_parity
from fusedformer import backends, reference
from fusedformer.parity import Case, run_case
from fusedformer.vocabulary import ACTIVATIONS, FUSED_ACTIVATIONS

ACTS = FUSED_ACTIVATIONS
# triton on a GPU always; on a CPU where it runs the GEMM (interpreted, at or above the GEMM's triton
# floor), else its cases skip saying why
TRITON_SKIP = None if torch.cuda.is_available() else backends.unsupported_reason("triton", "linear_act", "cpu")
BACKENDS = ["reference"] + ([] if TRITON_SKIP else ["triton"])
BACKEND_PARAMS = ["reference", pytest.param("triton", marks=pytest.mark.skipif(
    TRITON_SKIP is not None, reason=f"triton linear_act: {TRITON_SKIP}"))]


def torch_ffn(x, w1, b1, w2, b2, activation):
    return F.linear(ACTIVATIONS[activation].torch_forward(F.linear(x, w1, b1)), w2, b2)


def inputs(g, M, D, Fh, activation, bias=True, dtype=torch.float64):
    n1 = 2 * Fh if ACTIVATIONS[activation].gated else Fh
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    args = [r(M, D), r(n1, D) / D**0.5, 0.1 * r(n1) if bias else None, r(D, Fh) / Fh**0.5, 0.1 * r(D) if bias else None]
    return [a.to(dtype) if a is not None else None for a in args]


def case(M, D, Fh, activation, recompute, bias=True):
    def make(g):
        return inputs(g, M, D, Fh, activation, bias), {}, [0, 1, 2, 3, 4] if bias else [0, 1, 3]

    return Case("feed_forward", {"M": M, "d_model": D, "d_ff": Fh, "activation": activation}, make,
                lambda x, w1, b1, w2, b2, backend: ff.feed_forward(x, w1, b1, w2, b2, activation, backend=backend,
                                                                   recompute=recompute),
                lambda x, w1, b1, w2, b2: torch_ffn(x, w1, b1, w2, b2, activation))


@pytest.fixture
def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("recompute", (False, True))
@pytest.mark.parametrize("activation", ACTS)
def test_parity_every_activation_bf16(activation, recompute, backend, device):
    assert_parity(run_case(case(21, 24, 40, activation, recompute), backend, torch.bfloat16, device))


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("recompute", (False, True))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=str)
@pytest.mark.parametrize("activation,M,D,Fh", [("gelu", 7, 72, 40), ("swiglu", 1, 24, 41)])
def test_parity_dtypes(activation, M, D, Fh, dtype, recompute, backend, device):
    assert_parity(run_case(case(M, D, Fh, activation, recompute), backend, dtype, device))


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_parity_without_biases(backend, device):
    assert_parity(run_case(case(9, 24, 40, "geglu", True, bias=False), backend, torch.float16, device))


def _grads(x, w1, b1, w2, b2, activation, backend, recompute, dy):
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, w1, b1, w2, b2)]
    y = ff.feed_forward(*leaves, activation, backend=backend, recompute=recompute)
    grads = torch.autograd.grad(y, [t for t in leaves if t is not None], dy)
    return y.detach(), grads


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("activation", ("gelu", "swiglu", "relu"))
def test_recompute_equals_stored(activation, backend, device):
    g = torch.Generator().manual_seed(7)
    for dtype, tol in ((torch.float64, 0.0), (torch.float32, 1e-6)):
        args = [a.to(device) for a in inputs(g, 13, 24, 40, activation, dtype=dtype)]
        dy = torch.randn(13, 24, generator=g, dtype=dtype).to(device)
        y0, g0 = _grads(*args, activation, backend, False, dy)
        y1, g1 = _grads(*args, activation, backend, True, dy)
        torch.testing.assert_close(y1, y0, rtol=0, atol=0)
        for a, b in zip(g1, g0):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("activation", ("gelu", "geglu"))
def test_float64_matches_reference_function(activation, device):
    g = torch.Generator().manual_seed(8)
    x, w1, b1, w2, b2 = inputs(g, 6, 24, 40, activation)
    want = reference.feed_forward(x, w1, b1, w2, b2, activation)
    for backend in BACKENDS:
        got = ff.feed_forward(*(t.to(device) for t in (x, w1, b1, w2, b2)), activation, backend=backend)
        torch.testing.assert_close(got.cpu(), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("recompute", (False, True))
def test_backward_keeps_hidden_only_without_recompute(recompute):
    """recompute=True saves only the inputs and weights: no M x d_ff tensor waits for the backward."""
    g = torch.Generator().manual_seed(9)
    M, D, Fh = 32, 8, 48
    args = [t.requires_grad_() for t in inputs(g, M, D, Fh, "swiglu", dtype=torch.float32)]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ff.feed_forward(*args, "swiglu", backend="reference", recompute=recompute)
    large = [t for t in saved if t.dim() == 2 and t.shape[0] == M and t.shape[1] >= Fh]
    assert (len(large) == 0) == recompute, [tuple(t.shape) for t in saved]


def test_three_dim_input_and_nan(device):
    g = torch.Generator().manual_seed(10)
    x, w1, b1, w2, b2 = (t.float().to(device) for t in inputs(g, 2 * 5, 24, 40, "silu"))
    x3 = x.view(2, 5, 24).clone()
    x3[1, 2, 0] = float("nan")
    for backend in BACKENDS:
        for recompute in (False, True):
            y = ff.feed_forward(x3, w1, b1, w2, b2, "silu", backend=backend, recompute=recompute)
            assert y.shape == (2, 5, 24)
            assert torch.isnan(y[1, 2]).all()
            y[1, 2] = 0
            assert torch.isfinite(y).all()


def test_bad_input():
    x = torch.randn(3, 8)
    with pytest.raises(TypeError, match="recompute"):
        ff.feed_forward(x, torch.ones(6, 8), None, torch.ones(8, 6), None, recompute=1)
    with pytest.raises(ValueError, match="w2"):
        ff.feed_forward(x, torch.ones(12, 8), None, torch.ones(8, 12), None, "swiglu", recompute=True)


# --------------------------------------------------------------------------------------------
# the custom ops: opcheck and torch.compile
# --------------------------------------------------------------------------------------------


def _opcheck_args(device, bias, recompute, backend):
    g = torch.Generator().manual_seed(11)
    x, w1, b1, w2, b2 = (t.float().to(device) if t is not None else None
                         for t in inputs(g, 5, 16, 16, "geglu", bias=bias))
    return x, w1, b1, w2, b2, "geglu", backend, recompute


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("recompute", (False, True))
@pytest.mark.parametrize("bias", (True, False))
def test_opcheck(bias, recompute, backend, device):
    args = _opcheck_args(device, bias, recompute, backend)
    fwd_args = tuple(a.requires_grad_() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(torch.ops.fusedformer.feed_forward_fwd.default, fwd_args)
    y, hidden, preact = torch.ops.fusedformer.feed_forward_fwd.default(*args)
    dy = torch.randn_like(y)
    x, w1, b1, w2, b2, act, be, rc = (a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    bwd_args = (dy, x, w1, b1, w2, b2, hidden.detach(), preact.detach(), act, be, rc)
    torch.library.opcheck(torch.ops.fusedformer.feed_forward_bwd.default, bwd_args)


@pytest.mark.parametrize("recompute", (False, True))
def test_compile_fullgraph(recompute, device):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(12)
    args = [t.float().to(device) for t in inputs(g, 6, 16, 24, "swiglu")]
    dy = torch.randn(6, 16, generator=g).to(device)
    fn = lambda *a: ff.feed_forward(*a, "swiglu", recompute=recompute)  # noqa: E731
    y0, g0 = _grads(*args, "swiglu", None, recompute, dy)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    leaves = [t.detach().requires_grad_() for t in args]
    y1 = compiled(*leaves)
    g1 = torch.autograd.grad(y1, leaves, dy)
    torch.testing.assert_close(y1.detach(), y0)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ("gelu", "swiglu"))
@pytest.mark.parametrize("recompute", (False, True))
def test_gpu_parity_large(activation, recompute):
    assert_parity(run_case(case(4099, 1024, 4096, activation, recompute), "triton", torch.bfloat16, "cuda"))
